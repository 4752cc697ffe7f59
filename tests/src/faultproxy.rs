//! TCP fault proxy (placeholder).
