//! Admission checks with the apiserver's messages: names, labels, quantities, pod specs.

use std::collections::HashSet;

use serde_json::Value;

use super::status::FieldError;
use super::store::Res;

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const QUANTITY_MSG: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// None when `key` is a valid label/annotation key (`[prefix/]name`), else the reason.
pub fn label_key_errors(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns1123_subdomain(p)
    {
        return Some(format!("prefix part {DNS1123_SUBDOMAIN_MSG}"));
    }
    if !is_qualified_name_part(name) {
        return Some("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".to_string());
    }
    None
}

pub fn is_label_value(v: &str) -> bool {
    v.is_empty() || is_qualified_name_part(v)
}

/// Parses a resource quantity into its numeric value (cores, bytes, ...). None when malformed.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    if num.is_empty() || num.matches('.').count() > 1 || num[1..].contains(['+', '-']) {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

fn check_meta(res: Res, obj: &Value, errs: &mut Vec<FieldError>) {
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    if name.is_empty() {
        errs.push(FieldError::required("metadata.name"));
    } else if res == Res::Namespaces {
        if !is_dns1123_label(name) {
            errs.push(FieldError::invalid(
                "metadata.name",
                name,
                DNS1123_LABEL_MSG,
            ));
        }
    } else if res != Res::Events && !is_dns1123_subdomain(name) {
        errs.push(FieldError::invalid(
            "metadata.name",
            name,
            DNS1123_SUBDOMAIN_MSG,
        ));
    }
    if let Some(labels) = obj["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            if let Some(why) = label_key_errors(k) {
                errs.push(FieldError::invalid("metadata.labels", k, why));
            }
            match v.as_str() {
                Some(s) if is_label_value(s) => {}
                Some(s) => errs.push(FieldError::invalid(
                    format!("metadata.labels[{k}]"),
                    s,
                    LABEL_VALUE_MSG,
                )),
                None => errs.push(FieldError::invalid(
                    format!("metadata.labels[{k}]"),
                    &v.to_string(),
                    "must be a string",
                )),
            }
        }
    }
    if let Some(ann) = obj["metadata"]["annotations"].as_object() {
        for k in ann.keys() {
            if let Some(why) = label_key_errors(k) {
                errs.push(FieldError::invalid("metadata.annotations", k, why));
            }
        }
    }
}

fn check_resources(path: &str, c: &Value, errs: &mut Vec<FieldError>) {
    for section in ["requests", "limits"] {
        if let Some(m) = c["resources"][section].as_object() {
            for (k, v) in m {
                let s = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                if parse_quantity(&s).is_none_or(|n| n < 0.0) {
                    errs.push(FieldError::invalid(
                        format!("{path}.resources.{section}[{k}]"),
                        &s,
                        QUANTITY_MSG,
                    ));
                }
            }
        }
    }
}

#[allow(clippy::too_many_lines, reason = "the pod checks in field order")]
fn check_pod(obj: &Value, errs: &mut Vec<FieldError>) {
    let spec = &obj["spec"];
    let mut volumes = HashSet::new();
    for (i, v) in spec["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let name = v["name"].as_str().unwrap_or("");
        let path = format!("spec.volumes[{i}].name");
        if name.is_empty() {
            errs.push(FieldError::required(path));
        } else if !is_dns1123_label(name) {
            errs.push(FieldError::invalid(path, name, DNS1123_LABEL_MSG));
        } else if !volumes.insert(name.to_string()) {
            errs.push(FieldError::duplicate(path, name));
        }
    }
    let containers = spec["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if containers.is_empty() {
        errs.push(FieldError::required("spec.containers"));
    }
    let mut names = HashSet::new();
    for (list, items) in [
        ("initContainers", spec["initContainers"].as_array()),
        ("containers", Some(&containers.to_vec())),
    ] {
        for (i, c) in items
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let path = format!("spec.{list}[{i}]");
            let name = c["name"].as_str().unwrap_or("");
            if name.is_empty() {
                errs.push(FieldError::required(format!("{path}.name")));
            } else if !is_dns1123_label(name) {
                errs.push(FieldError::invalid(
                    format!("{path}.name"),
                    name,
                    DNS1123_LABEL_MSG,
                ));
            } else if !names.insert(name.to_string()) {
                errs.push(FieldError::duplicate(format!("{path}.name"), name));
            }
            if c["image"].as_str().unwrap_or("").trim().is_empty() {
                errs.push(FieldError::required(format!("{path}.image")));
            }
            check_resources(&path, c, errs);
            for (j, m) in c["volumeMounts"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let vname = m["name"].as_str().unwrap_or("");
                if !volumes.contains(vname) {
                    errs.push(FieldError::not_found(
                        format!("{path}.volumeMounts[{j}].name"),
                        vname,
                    ));
                }
                if m["mountPath"].as_str().unwrap_or("").is_empty() {
                    errs.push(FieldError::required(format!(
                        "{path}.volumeMounts[{j}].mountPath"
                    )));
                }
            }
            for (j, e) in c["env"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if e["name"].as_str().unwrap_or("").is_empty() {
                    errs.push(FieldError::required(format!("{path}.env[{j}].name")));
                }
            }
        }
    }
    if let Some(p) = spec["restartPolicy"].as_str()
        && !["Always", "OnFailure", "Never"].contains(&p)
    {
        errs.push(FieldError::not_supported(
            "spec.restartPolicy",
            p,
            &["Always", "OnFailure", "Never"],
        ));
    }
    if let Some(d) = spec.get("activeDeadlineSeconds").filter(|d| !d.is_null())
        && d.as_i64().is_none_or(|d| d <= 0)
    {
        errs.push(FieldError::invalid(
            "spec.activeDeadlineSeconds",
            &d.to_string(),
            "must be between 1 and 2147483647, inclusive",
        ));
    }
}

fn check_data_keys(obj: &Value, errs: &mut Vec<FieldError>) {
    for section in ["data", "stringData", "binaryData"] {
        if let Some(m) = obj[section].as_object() {
            for k in m.keys() {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
                if !ok {
                    errs.push(FieldError::invalid(format!("{section}[{k}]"), k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
                }
            }
        }
    }
}

/// Every field error of an object about to be stored.
pub fn validate(res: Res, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    check_meta(res, obj, &mut errs);
    match res {
        Res::Pods => check_pod(obj, &mut errs),
        Res::Secrets | Res::ConfigMaps => check_data_keys(obj, &mut errs),
        Res::Events if obj["involvedObject"].is_null() => {
            errs.push(FieldError::required("involvedObject"));
        }
        _ => {}
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_quantities() {
        assert!(is_dns1123_subdomain("a.b-c"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_label("a.b"));
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("1Gi"), Some(1_073_741_824.0));
        assert_eq!(parse_quantity("2e3"), Some(2000.0));
        assert_eq!(parse_quantity("1.5"), Some(1.5));
        assert_eq!(parse_quantity("abc"), None);
        assert_eq!(parse_quantity("1Qi"), None);
        assert!(label_key_errors("cloud.google.com/gke-spot").is_none());
        assert!(label_key_errors("bad key").is_some());
    }

    #[test]
    fn pod_errors() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "a", "image": "x", "resources": {"requests": {"cpu": "lots"}}}]}});
        let errs: Vec<String> = validate(Res::Pods, &pod)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            errs,
            [
                "spec.containers[0].image",
                "spec.containers[1].name",
                "spec.containers[1].resources.requests[cpu]"
            ]
        );
    }
}
