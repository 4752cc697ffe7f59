//! Strategic merge patch (the `kubectl patch --type strategic` flavour) for Pod objects.
//!
//! Like a JSON merge patch, except that lists the Pod schema marks `patchStrategy: merge` are merged
//! item by item on their `patchMergeKey` (containers by `name`, env by `name`, volumeMounts by
//! `mountPath`, ...) instead of being replaced, so an operator can add one env var or sidecar without
//! restating the generated ones. Directives: `$patch: replace` (an object or list replaces the target
//! instead of merging), `$patch: delete` (in a list item: remove the item with that key; in an object:
//! remove the object), `null` removes a field. Other lists are replaced, as the apiserver does.

use serde_json::{Map, Value};

const DIRECTIVE: &str = "$patch";

/// The `patchMergeKey` of a list field of the Pod schema (paths use `[]` for list items).
fn merge_key(path: &str) -> Option<&'static str> {
    const CONTAINERS: [&str; 3] = [
        "spec.containers[]",
        "spec.initContainers[]",
        "spec.ephemeralContainers[]",
    ];
    let in_container = |field: &str| CONTAINERS.iter().any(|c| path == format!("{c}.{field}"));
    Some(match path {
        "spec.containers"
        | "spec.initContainers"
        | "spec.ephemeralContainers"
        | "spec.volumes"
        | "spec.imagePullSecrets"
        | "spec.schedulingGates"
        | "spec.resourceClaims" => "name",
        "spec.hostAliases" => "ip",
        "spec.topologySpreadConstraints" => "topologyKey",
        "metadata.ownerReferences" => "uid",
        _ if in_container("env") => "name",
        _ if in_container("ports") => "containerPort",
        _ if in_container("volumeMounts") => "mountPath",
        _ if in_container("volumeDevices") => "devicePath",
        _ if in_container("resizePolicy") => "resourceName",
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmpError {
    #[error("the patch must be a JSON object")]
    NotAnObject,
    #[error("at {path}: unknown $patch directive {directive:?} (use replace or delete)")]
    Directive { path: String, directive: String },
    #[error("at {path}: a list item has no {key:?} (this list merges on it)")]
    MissingKey { path: String, key: &'static str },
}

/// Applies `patch` to `target` (the whole Pod as JSON).
pub fn apply(target: &mut Value, patch: &Value) -> Result<(), SmpError> {
    let Value::Object(p) = patch else {
        return Err(SmpError::NotAnObject);
    };
    merge_object(target, p, "")
}

fn directive<'a>(obj: &'a Map<String, Value>, path: &str) -> Result<Option<&'a str>, SmpError> {
    match obj.get(DIRECTIVE) {
        None => Ok(None),
        Some(Value::String(d)) if d == "replace" || d == "delete" => Ok(Some(d)),
        Some(other) => Err(SmpError::Directive {
            path: display(path),
            directive: other.to_string(),
        }),
    }
}

fn display(path: &str) -> String {
    if path.is_empty() {
        "the pod".into()
    } else {
        path.into()
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A patch value with its directives removed (what gets stored when nothing is there to merge with).
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != DIRECTIVE)
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|i| i.get(DIRECTIVE).is_none())
                .map(strip)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn merge_object(target: &mut Value, doc: &Map<String, Value>, path: &str) -> Result<(), SmpError> {
    if directive(doc, path)? == Some("replace") || !target.is_object() {
        *target = strip(&Value::Object(doc.clone()));
        return Ok(());
    }
    let t = target.as_object_mut().expect("checked above");
    for (k, v) in doc {
        if k == DIRECTIVE {
            continue;
        }
        let here = child(path, k);
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(pv) => {
                if directive(pv, &here)? == Some("delete") {
                    t.remove(k);
                } else {
                    merge_object(t.entry(k.clone()).or_insert(Value::Null), pv, &here)?;
                }
            }
            Value::Array(items) => match merge_key(&here) {
                Some(key) => {
                    let slot = t
                        .entry(k.clone())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    merge_list(slot, items, key, &here)?;
                }
                None => {
                    t.insert(k.clone(), strip(v));
                }
            },
            scalar => {
                t.insert(k.clone(), scalar.clone());
            }
        }
    }
    Ok(())
}

fn merge_list(
    target: &mut Value,
    items: &[Value],
    key: &'static str,
    path: &str,
) -> Result<(), SmpError> {
    let item_path = format!("{path}[]");
    // `{"$patch": "replace"}` among the items: the list becomes exactly the other items.
    let replace = items.iter().any(|i| {
        i.as_object()
            .is_some_and(|o| o.get(DIRECTIVE) == Some(&Value::String("replace".into())))
    });
    if replace || !target.is_array() {
        *target = strip(&Value::Array(items.to_vec()));
        return Ok(());
    }
    let list = target.as_array_mut().expect("checked above");
    for item in items {
        let Value::Object(obj) = item else {
            // A scalar in a keyed list cannot be matched: the apiserver rejects it too.
            return Err(SmpError::MissingKey {
                path: item_path,
                key,
            });
        };
        let Some(id) = obj.get(key) else {
            return Err(SmpError::MissingKey {
                path: item_path,
                key,
            });
        };
        let pos = list.iter().position(|t| t.get(key) == Some(id));
        match (directive(obj, &item_path)?, pos) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => merge_object(&mut list[i], obj, &item_path)?,
            (_, None) => list.push(strip(item)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "p", "labels": {"a": "1"}},
            "spec": {
                "containers": [
                    {"name": "build", "image": "alpine", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                     "volumeMounts": [{"name": "builds", "mountPath": "/builds"}]},
                    {"name": "helper", "image": "helper", "env": [{"name": "H", "value": "h"}]}
                ],
                "volumes": [{"name": "builds", "emptyDir": {}}],
                "tolerations": [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
            }
        })
    }

    #[test]
    fn keyed_lists_merge_item_by_item() {
        let mut p = pod();
        apply(
            &mut p,
            &json!({"spec": {"containers": [
                {"name": "build", "env": [{"name": "B", "value": "two"}, {"name": "C", "value": "3"}],
                 "volumeMounts": [{"name": "ssd", "mountPath": "/ssd"}]},
                {"name": "sidecar", "image": "envoy"}
            ], "volumes": [{"name": "ssd", "hostPath": {"path": "/mnt/ssd"}}]}}),
        )
        .unwrap();
        let c = &p["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 3);
        assert_eq!(c[0]["image"], "alpine", "untouched fields stay");
        assert_eq!(
            c[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "two"}, {"name": "C", "value": "3"}])
        );
        assert_eq!(c[0]["volumeMounts"].as_array().unwrap().len(), 2);
        assert_eq!(c[1]["env"][0]["name"], "H");
        assert_eq!(c[2], json!({"name": "sidecar", "image": "envoy"}));
        assert_eq!(p["spec"]["volumes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn unkeyed_lists_are_replaced_and_null_removes() {
        let mut p = pod();
        apply(
            &mut p,
            &json!({"metadata": {"labels": {"a": null, "b": "2"}},
                    "spec": {"tolerations": [{"operator": "Exists"}]}}),
        )
        .unwrap();
        assert_eq!(p["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(p["spec"]["tolerations"], json!([{"operator": "Exists"}]));
    }

    #[test]
    fn directives_delete_and_replace() {
        let mut p = pod();
        apply(
            &mut p,
            &json!({"spec": {
                "containers": [{"name": "build", "env": [{"name": "A", "$patch": "delete"}]},
                               {"name": "helper", "$patch": "delete"}],
                "volumes": [{"$patch": "replace"}, {"name": "only", "emptyDir": {"medium": "Memory"}}]
            }}),
        )
        .unwrap();
        let c = p["spec"]["containers"].as_array().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0]["env"], json!([{"name": "B", "value": "2"}]));
        assert_eq!(
            p["spec"]["volumes"],
            json!([{"name": "only", "emptyDir": {"medium": "Memory"}}])
        );
        let mut p = pod();
        apply(
            &mut p,
            &json!({"metadata": {"labels": {"$patch": "replace", "z": "9"}}}),
        )
        .unwrap();
        assert_eq!(p["metadata"]["labels"], json!({"z": "9"}));
    }

    #[test]
    fn malformed_patches_name_the_problem() {
        let mut p = pod();
        assert_eq!(apply(&mut p, &json!([1])), Err(SmpError::NotAnObject));
        let e = apply(&mut p, &json!({"spec": {"containers": [{"image": "x"}]}})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at spec.containers[]: a list item has no \"name\" (this list merges on it)"
        );
        let e = apply(&mut p, &json!({"spec": {"$patch": "merge-please"}})).unwrap_err();
        assert!(e.to_string().contains("unknown $patch directive"), "{e}");
        assert_eq!(p, pod(), "these failures stop before any change");
    }
}
