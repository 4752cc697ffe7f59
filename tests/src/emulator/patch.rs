//! PATCH bodies: JSON merge patch (RFC 7386), strategic merge (merge patch plus lists of
//! named objects merged by key) and JSON patch (RFC 6902).

use serde_json::Value;

/// Which patch dialect a `Content-Type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Applies `patch` to `target`; the error names what is wrong with the patch.
pub fn apply(kind: PatchKind, target: &mut Value, patch: &Value) -> Result<(), String> {
    match kind {
        PatchKind::Merge => {
            merge(target, patch, false);
            Ok(())
        }
        PatchKind::Strategic => {
            merge(target, patch, true);
            Ok(())
        }
        PatchKind::Json => json_patch(target, patch),
    }
}

/// The key that identifies list items for strategic merge, when every item has it.
fn merge_key(items: &[Value]) -> Option<&'static str> {
    ["name", "type", "containerPort", "ip", "mountPath"]
        .into_iter()
        .find(|k| !items.is_empty() && items.iter().all(|i| i.get(*k).is_some()))
}

fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            let t = target.as_object_mut().expect("just made an object");
            for (k, v) in p {
                if k == "$patch"
                    || k.starts_with("$setElementOrder")
                    || k.starts_with("$retainKeys")
                {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v, strategic);
                }
            }
        }
        Value::Array(items) if strategic => {
            if let (Some(existing), Some(key)) = (target.as_array_mut(), merge_key(items))
                && existing.iter().all(|e| e.get(key).is_some())
            {
                for item in items {
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match existing.iter().position(|e| e[key] == item[key]) {
                        Some(i) if delete => {
                            existing.remove(i);
                        }
                        Some(i) => merge(&mut existing[i], item, true),
                        None if delete => {}
                        None => {
                            let mut fresh = Value::Null;
                            merge(&mut fresh, item, true);
                            existing.push(fresh);
                        }
                    }
                }
                return;
            }
            *target = patch.clone();
        }
        _ => *target = patch.clone(),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(Vec<String>, String), String> {
    if path.is_empty() {
        return Err("the root document cannot be patched".into());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    let mut parts: Vec<String> = rest.split('/').map(unescape).collect();
    let last = parts.pop().unwrap_or_default();
    Ok((parts, last))
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    parts: &[String],
    path: &str,
) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for p in parts {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path {path:?} does not exist"))?;
    }
    Ok(cur)
}

fn get_at(doc: &Value, path: &str) -> Result<Value, String> {
    doc.pointer(path)
        .cloned()
        .ok_or_else(|| format!("path {path:?} does not exist"))
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parts, last) = split_pointer(path)?;
    match parent_mut(doc, &parts, path)? {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("path {path:?} does not exist")),
        Value::Array(a) => {
            let i = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < a.len())
                .ok_or_else(|| format!("index out of range in {path:?}"))?;
            Ok(a.remove(i))
        }
        _ => Err(format!("path {path:?} does not exist")),
    }
}

fn add_at(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let (parts, last) = split_pointer(path)?;
    match parent_mut(doc, &parts, path)? {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("invalid index in {path:?}"))?
            };
            if i > a.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("path {path:?} does not exist")),
    }
}

fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let operations = patch
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for op in operations {
        let pointer = op["path"]
            .as_str()
            .ok_or("every JSON patch operation needs a string \"path\"")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("operation on {pointer:?} needs a \"value\""))
        };
        match op["op"].as_str().unwrap_or("") {
            "add" => add_at(doc, pointer, value()?)?,
            "remove" => {
                remove_at(doc, pointer)?;
            }
            "replace" => {
                remove_at(doc, pointer)?;
                add_at(doc, pointer, value()?)?;
            }
            "test" => {
                if get_at(doc, pointer)? != value()? {
                    return Err(format!("test operation on {pointer:?} failed"));
                }
            }
            "move" => {
                let from = op["from"].as_str().ok_or("move needs \"from\"")?;
                let v = remove_at(doc, from)?;
                add_at(doc, pointer, v)?;
            }
            "copy" => {
                let from = op["from"].as_str().ok_or("copy needs \"from\"")?;
                let v = get_at(doc, from)?;
                add_at(doc, pointer, v)?;
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_removes_nulls() {
        let mut t = json!({"a": 1, "b": {"c": 2}});
        apply(PatchKind::Merge, &mut t, &json!({"a": null, "b": {"d": 3}})).unwrap();
        assert_eq!(t, json!({"b": {"c": 2, "d": 3}}));
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let mut t =
            json!({"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]});
        apply(
            PatchKind::Strategic,
            &mut t,
            &json!({"containers": [{"name": "b", "image": "z"}]}),
        )
        .unwrap();
        assert_eq!(t["containers"][1]["image"], "z");
        assert_eq!(t["containers"][0]["image"], "x");
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a": "1"}}, "l": [1, 2]});
        apply(
            PatchKind::Json,
            &mut t,
            &json!([{"op": "add", "path": "/metadata/labels/b~1c", "value": "2"}, {"op": "replace", "path": "/l/0", "value": 9}, {"op": "remove", "path": "/metadata/labels/a"}]),
        )
        .unwrap();
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"b/c": "2"}}, "l": [9, 2]})
        );
        assert!(
            apply(
                PatchKind::Json,
                &mut t,
                &json!([{"op": "test", "path": "/l/0", "value": 1}])
            )
            .is_err()
        );
    }
}
