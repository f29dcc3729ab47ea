"""Tests of the fused ops, shared by every backend (cpp, triton) and device (cpu, cuda)."""
