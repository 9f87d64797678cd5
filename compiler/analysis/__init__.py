"""Read-only analyses over the IR."""
