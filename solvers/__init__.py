"""Solvers: expert placement, parallel folding, cache sizing, elastic scaling (imported as moeplan.solvers)."""
