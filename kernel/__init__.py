"""The shared kernel of Civitas: the exception root, the short-lived store, SQL plumbing and
field encryption. Every domain package may import it; it imports none of them."""
