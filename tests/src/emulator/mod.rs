//! Kubernetes API emulator (placeholder).
