"""Training backends behind one interface."""
