//! gitlab-runner harness: runs a custom executor binary the way gitlab-runner 19.x does
//! (shared/reference/gitlab-runner.md §1) and reports the job log and result as the runner would.

mod job;
mod presign;
mod runner;
pub mod script;

pub use job::{CacheSpec, JobBuilder, JobSpec, Service, Variable};
pub use presign::CacheConfig;
pub use runner::{CachePresigner, Cancel, CancelMode, JobOutcome, JobResult, Runner, StageRecord};
