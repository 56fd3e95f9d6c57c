//! Convex's argument validators (`v.string()`, `v.optional(..)`, `v.id("jobs")`...) and value
//! limits, with error texts shaped like the real deployment's, so a client that passes the fake
//! passes Convex.

use std::fmt;

use serde_json::{Map, Value};

/// Lowercase Crockford base32: the alphabet of Convex ids.
pub const ID_ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";

// Convex's value limits, defined once beside the caps the coordinator derives from them.
pub use fondation_proto::limits::{
    CONVEX_ARGUMENT_BYTES as MAX_ARGS_BYTES, CONVEX_ARRAY_ELEMENTS as MAX_ARRAY_ELEMENTS,
    CONVEX_DOCUMENT_BYTES as MAX_DOCUMENT_BYTES, CONVEX_NESTING_DEPTH as MAX_DEPTH,
    CONVEX_OBJECT_FIELDS as MAX_OBJECT_FIELDS,
};

/// Whether `id` has the shape of a Convex document id (31 to 37 Crockford base32 characters).
pub fn is_convex_id(id: &str) -> bool {
    (31..=37).contains(&id.len()) && id.bytes().all(|byte| ID_ALPHABET.contains(&byte))
}

#[derive(Debug, Clone)]
pub enum Validator {
    String,
    Float64,
    Boolean,
    Null,
    Id(&'static str),
    Literal(&'static str),
    Union(Vec<Validator>),
    Array(Box<Validator>),
    Object(Vec<Field>),
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: &'static str,
    pub validator: Validator,
    pub optional: bool,
}

pub fn required(name: &'static str, validator: Validator) -> Field {
    Field {
        name,
        validator,
        optional: false,
    }
}

pub fn optional(name: &'static str, validator: Validator) -> Field {
    Field {
        name,
        validator,
        optional: true,
    }
}

pub fn literals(values: &[&'static str]) -> Validator {
    Validator::Union(
        values
            .iter()
            .map(|value| Validator::Literal(value))
            .collect(),
    )
}

impl fmt::Display for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Validator::String => f.write_str("v.string()"),
            Validator::Float64 => f.write_str("v.float64()"),
            Validator::Boolean => f.write_str("v.boolean()"),
            Validator::Null => f.write_str("v.null()"),
            Validator::Id(table) => write!(f, "v.id({table:?})"),
            Validator::Literal(value) => write!(f, "v.literal({value:?})"),
            Validator::Union(variants) => {
                f.write_str("v.union(")?;
                for (index, variant) in variants.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    variant.fmt(f)?;
                }
                f.write_str(")")
            }
            Validator::Array(inner) => write!(f, "v.array({inner})"),
            Validator::Object(fields) => {
                let mut sorted: Vec<&Field> = fields.iter().collect();
                sorted.sort_by_key(|field| field.name);
                f.write_str("v.object({")?;
                for (index, field) in sorted.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}: {}", field.name, FieldDisplay(field))?;
                }
                f.write_str("})")
            }
        }
    }
}

struct FieldDisplay<'a>(&'a Field);

impl fmt::Display for FieldDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.optional {
            write!(f, "v.optional({})", self.0.validator)
        } else {
            self.0.validator.fmt(f)
        }
    }
}

/// Looks up which table a known id belongs to (`None` for ids the fake never issued).
pub type TableOf<'a> = &'a dyn Fn(&str) -> Option<&'static str>;

impl Validator {
    /// Checks `value`; the error is the text after `ArgumentValidationError: `.
    pub fn check(&self, value: &Value, path: &str, table_of: TableOf<'_>) -> Result<(), String> {
        let matches = match (self, value) {
            (Validator::String, Value::String(_)) => true,
            (Validator::Float64, Value::Number(_)) => true,
            (Validator::Boolean, Value::Bool(_)) => true,
            (Validator::Null, Value::Null) => true,
            (Validator::Id(table), Value::String(id)) => {
                is_convex_id(id) && table_of(id).is_none_or(|known| known == *table)
            }
            (Validator::Literal(expected), Value::String(actual)) => expected == actual,
            (Validator::Union(variants), _) => variants
                .iter()
                .any(|variant| variant.check(value, path, table_of).is_ok()),
            (Validator::Array(inner), Value::Array(items)) => {
                for (index, item) in items.iter().enumerate() {
                    inner.check(item, &format!("{path}[{index}]"), table_of)?;
                }
                true
            }
            (Validator::Object(fields), Value::Object(object)) => {
                return self.check_object(fields, object, path, table_of)
            }
            _ => false,
        };
        if matches {
            Ok(())
        } else {
            Err(mismatch(path, value, &self.to_string()))
        }
    }

    fn check_object(
        &self,
        fields: &[Field],
        object: &Map<String, Value>,
        path: &str,
        table_of: TableOf<'_>,
    ) -> Result<(), String> {
        let path_line = if path.is_empty() {
            String::new()
        } else {
            format!("Path: {path}\n")
        };
        for name in object.keys() {
            if !fields.iter().any(|field| field.name == name) {
                return Err(format!(
                    "Object contains extra field `{name}` that is not in the validator.\n\n\
                     {path_line}Object: {}\nValidator: {self}",
                    show(&Value::Object(object.clone()))
                ));
            }
        }
        for field in fields {
            let field_path = format!("{path}.{}", field.name);
            match object.get(field.name) {
                None if field.optional => {}
                None => {
                    return Err(format!(
                        "Object is missing the required field `{}`. Consider wrapping the field \
                         validator in `v.optional(...)` if this is expected.\n\n\
                         {path_line}Object: {}\nValidator: {self}",
                        field.name,
                        show(&Value::Object(object.clone()))
                    ))
                }
                // Convex has no "null means absent": an optional field must be omitted.
                Some(Value::Null) if field.optional && !field.validator.accepts_null() => {
                    return Err(mismatch(
                        &field_path,
                        &Value::Null,
                        &FieldDisplay(field).to_string(),
                    ))
                }
                Some(value) => field.validator.check(value, &field_path, table_of)?,
            }
        }
        Ok(())
    }

    fn accepts_null(&self) -> bool {
        match self {
            Validator::Null => true,
            Validator::Union(variants) => variants.iter().any(Validator::accepts_null),
            _ => false,
        }
    }
}

fn mismatch(path: &str, value: &Value, validator: &str) -> String {
    let path_line = if path.is_empty() {
        String::new()
    } else {
        format!("Path: {path}\n")
    };
    format!(
        "Value does not match validator.\n{path_line}Value: {}\nValidator: {validator}",
        show(value)
    )
}

/// A value as quoted in error messages, cut short like Convex does for big values.
pub fn show(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Convex's structural limits on any value: nesting depth, fields per object, array length.
pub fn check_limits(value: &Value, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "Value is too deeply nested ({depth} levels > maximum depth {MAX_DEPTH})"
        ));
    }
    match value {
        Value::Array(items) => {
            if items.len() > MAX_ARRAY_ELEMENTS {
                return Err(format!(
                    "Array length is too long ({} > maximum length {MAX_ARRAY_ELEMENTS})",
                    items.len()
                ));
            }
            items
                .iter()
                .try_for_each(|item| check_limits(item, depth + 1))
        }
        Value::Object(object) => {
            if object.len() > MAX_OBJECT_FIELDS {
                return Err(format!(
                    "Object has too many fields ({} > maximum number {MAX_OBJECT_FIELDS})",
                    object.len()
                ));
            }
            object
                .values()
                .try_for_each(|item| check_limits(item, depth + 1))
        }
        _ => Ok(()),
    }
}

/// Size of a value as Convex counts it for the 1 MiB document limit: string bytes (not their JSON
/// escapes), 8 bytes per number, plus small per-value overheads.
pub fn convex_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 1,
        Value::Number(_) => 9,
        Value::String(text) => text.len() + 2,
        Value::Array(items) => 2 + items.iter().map(convex_size).sum::<usize>(),
        Value::Object(object) => {
            2 + object
                .iter()
                .map(|(key, value)| key.len() + 1 + convex_size(value))
                .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim_validator() -> Validator {
        Validator::Object(vec![
            required("workerId", Validator::String),
            optional("leaseMs", Validator::Float64),
        ])
    }

    fn no_tables(_: &str) -> Option<&'static str> {
        None
    }

    #[test]
    fn null_for_an_optional_field_is_rejected() {
        let error = claim_validator()
            .check(&json!({"workerId": "w", "leaseMs": null}), "", &no_tables)
            .expect_err("null rejected");
        assert_eq!(
            error,
            "Value does not match validator.\nPath: .leaseMs\nValue: null\nValidator: \
             v.optional(v.float64())"
        );
    }

    #[test]
    fn extra_and_missing_fields_are_rejected() {
        let extra = claim_validator()
            .check(&json!({"workerId": "w", "foo": 1}), "", &no_tables)
            .expect_err("extra rejected");
        assert!(
            extra.starts_with("Object contains extra field `foo` that is not in the validator.")
        );
        let missing = claim_validator()
            .check(&json!({}), "", &no_tables)
            .expect_err("missing rejected");
        assert!(missing.starts_with("Object is missing the required field `workerId`"));
        assert!(claim_validator()
            .check(&json!({"workerId": "w"}), "", &no_tables)
            .is_ok());
    }

    #[test]
    fn ids_are_checked_for_shape_and_table() {
        let id = "k57a8x2m9q0r1s3t4v5w6x7y8z9a0b1c";
        let jobs_table = |candidate: &str| (candidate == id).then_some("jobs");
        assert!(Validator::Id("jobs")
            .check(&json!(id), ".jobId", &jobs_table)
            .is_ok());
        assert!(Validator::Id("repositories")
            .check(&json!(id), ".repositoryId", &jobs_table)
            .is_err());
        assert!(Validator::Id("jobs")
            .check(&json!("not-an-id"), ".jobId", &jobs_table)
            .is_err());
    }
}
