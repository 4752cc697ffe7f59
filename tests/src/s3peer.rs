//! S3 peer launcher (placeholder).
