//! Deterministic, DNS-1123-safe names and label values derived from the runner's variables.

use sha2::{Digest, Sha256};

/// Label key marking every object this executor creates.
pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "spotrun-executor";
/// Label carrying the pod name on the pod and its companion objects (secret).
pub const POD_LABEL: &str = "spotrun.dev/pod";
/// Label marking the kind of companion object.
pub const KIND_LABEL: &str = "spotrun.dev/kind";
/// Annotation set once `prepare` saw the pod running (gc treats pods without it as stale).
pub const PREPARED_ANNOTATION: &str = "spotrun.dev/prepared";

#[must_use]
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[must_use]
pub fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

/// Lower-cases and replaces anything outside `[a-z0-9-]`, collapsing runs, trimming dashes.
#[must_use]
pub fn dns_fragment(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out: String = out.trim_matches('-').chars().take(max).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// A label value (≤ 63, alphanumeric ends); long values keep a hash suffix so they stay distinct.
#[must_use]
pub fn label_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if v.len() > 63 {
        let h = short_hash(s, 8);
        v = format!("{}-{h}", &v[..54]);
    }
    v.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[must_use]
pub fn short_hash(s: &str, hex_len: usize) -> String {
    let d = Sha256::digest(s.as_bytes());
    hex::encode(d)[..hex_len].to_string()
}

/// The job pod's name: `spotrun-<short token>-c<concurrent id>-<job id>`, ≤ 63 characters.
///
/// Deterministic so that `config` (hostname), `prepare` retries, `run` and `cleanup` agree with
/// no state between calls.
#[must_use]
pub fn pod_name(runner_short_token: &str, concurrent_id: &str, job_id: u64) -> String {
    let token = dns_fragment(runner_short_token, 12);
    let conc = dns_fragment(concurrent_id, 6);
    let mut parts = vec!["spotrun".to_string()];
    if !token.is_empty() {
        parts.push(token);
    }
    if !conc.is_empty() {
        parts.push(format!("c{conc}"));
    }
    parts.push(job_id.to_string());
    parts.join("-")
}

/// The registry secret of a pod.
#[must_use]
pub fn secret_name(pod: &str) -> String {
    format!("{pod}-registry")
}

/// DNS-safe container name for service `index` from its alias or image; unique within the pod.
#[must_use]
pub fn service_container_name(alias: &str, image: &str, index: usize, taken: &[String]) -> String {
    let from_alias = dns_fragment(alias, 40);
    let base = if from_alias.is_empty() {
        let last = image.rsplit('/').next().unwrap_or(image);
        let last = last.split([':', '@']).next().unwrap_or(last);
        dns_fragment(last, 40)
    } else {
        from_alias
    };
    let reserved = ["build", "helper"];
    let candidate = if base.is_empty() {
        format!("svc-{index}")
    } else {
        format!("svc-{base}")
    };
    if reserved.contains(&candidate.as_str()) || taken.contains(&candidate) {
        format!("svc-{index}")
    } else {
        candidate
    }
}

/// Name of the preemption record of (project, pipeline, job name).
#[must_use]
pub fn preemption_record_name(project_id: u64, pipeline_id: u64, job_name: &str) -> String {
    format!(
        "spotrun-preempted-{}",
        short_hash(&format!("{project_id}/{pipeline_id}/{job_name}"), 20)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_dns_labels_and_deterministic() {
        assert_eq!(
            pod_name("t1_AbC_9x", "3", 987_654),
            "spotrun-t1-abc-9x-c3-987654"
        );
        let long = pod_name(&"Z".repeat(200), &"9".repeat(40), u64::MAX);
        assert!(is_dns1123_label(&long), "{long}");
        assert!(
            is_dns1123_label(&secret_name(&long)),
            "secret name too long"
        );
        assert_eq!(pod_name("", "", 5), "spotrun-5");
    }

    #[test]
    fn service_names() {
        assert_eq!(
            service_container_name("db", "postgres:16", 0, &[]),
            "svc-db"
        );
        assert_eq!(
            service_container_name("", "docker.io/library/redis:7@sha256:x", 1, &[]),
            "svc-redis"
        );
        assert_eq!(
            service_container_name("db", "x", 2, &["svc-db".into()]),
            "svc-2"
        );
        assert_eq!(service_container_name("__", "", 3, &[]), "svc-3");
    }

    #[test]
    fn label_values() {
        assert_eq!(
            label_value("acme/platform inventory"),
            "acme_platform_inventory"
        );
        let v = label_value(&"a".repeat(100));
        assert!(is_label_value(&v) && v.len() <= 63, "{v}");
        assert!(!is_label_value("-x"));
    }
}
