"""Distributed mechanisms: process groups, shuffle-BN, the fused EMA, the key queue."""
