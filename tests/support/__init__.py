"""Test support: real servers on loopback, key material, small helpers. Test code only."""
