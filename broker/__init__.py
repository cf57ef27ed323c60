"""Login orchestration: choosing an upstream, the callback, account resolution and linking."""
