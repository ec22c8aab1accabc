"""Model backends behind one interface: a chat request in, raw text out (see base.py)."""
