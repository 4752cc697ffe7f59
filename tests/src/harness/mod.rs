//! gitlab-runner harness (placeholder).
