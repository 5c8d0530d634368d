//! Just enough JSON Schema (as OpenAPI 3.1 uses it) to check what a server
//! really answers against its documented schema: `$ref`, `oneOf`, `type`
//! (one or a list), `enum`, `required`, `properties` and `items`.

use serde_json::Value;

/// Checks `value` against `schema`; `doc` resolves `$ref`s. The error names
/// the JSON path of the first mismatch.
pub fn validate(doc: &Value, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let target = r
            .strip_prefix("#/")
            .unwrap_or(r)
            .split('/')
            .fold(doc, |v, k| &v[k]);
        if target.is_null() {
            return Err(format!("{path}: unresolved $ref {r}"));
        }
        return validate(doc, target, value, path);
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let errors: Vec<String> = options
            .iter()
            .filter_map(|s| validate(doc, s, value, path).err())
            .collect();
        if errors.len() == options.len() {
            return Err(format!("{path}: matches no oneOf: {errors:?}"));
        }
        return Ok(());
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.iter().any(|t| is_type(value, t)) {
            return Err(format!("{path}: expected {types:?}, got {value}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            return Err(format!("{path}: {value} is not one of {allowed:?}"));
        }
    }
    if let Value::Object(map) = value {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = r.as_str().unwrap_or_default();
            if !map.contains_key(k) {
                return Err(format!("{path}: required property {k:?} is missing"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                if let Some(v) = map.get(k) {
                    validate(doc, s, v, &format!("{path}.{k}"))?;
                }
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            validate(doc, s, v, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn catches_missing_and_mistyped_fields() {
        let doc = json!({ "components": { "schemas": { "A": { "type": "object", "required": ["n"], "properties": { "n": { "type": "integer" } } } } } });
        let a = json!({ "$ref": "#/components/schemas/A" });
        assert!(validate(&doc, &a, &json!({ "n": 1 }), "$").is_ok());
        assert!(validate(&doc, &a, &json!({}), "$")
            .unwrap_err()
            .contains("\"n\""));
        assert!(validate(&doc, &a, &json!({ "n": "1" }), "$")
            .unwrap_err()
            .contains("$.n"));
        let list = json!({ "type": "array", "items": a });
        assert!(validate(&doc, &list, &json!([{ "n": 1 }, { "n": 0.5 }]), "$").is_err());
    }
}
