"""The OpenID Connect provider that agency sites integrate with, on Authlib's server classes."""
