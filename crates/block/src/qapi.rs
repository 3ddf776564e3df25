//! QAPI input, read the way QEMU reads it: the dotted `key=value` syntax of command-line
//! options (`driver=raw,file.filename=a`) and [`Members`], a reader of one JSON object
//! whose errors are QEMU's words ("Parameter 'x' is missing", "Invalid parameter type
//! for 'size', expected: integer"). `blockdev-add` options and QMP command arguments
//! are both parsed through it, so the same mistake gets the same message everywhere.

use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use serde_json::Map;
use serde_json::Value;

/// Parses QEMU's dotted key=value form (`driver=raw,file.driver=file,file.filename=a`)
/// into nested JSON objects of strings; `,,` is a literal comma. `implied` names the
/// key of a first item without `=` (`--export nbd,...` means `type=nbd`).
pub fn parse_keyval(text: &str, implied: Option<&str>) -> Result<Map<String, Value>> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    let mut root = Map::new();
    for (i, item) in items.into_iter().enumerate() {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 && implied.is_some() => (implied.unwrap().to_string(), item),
            None => {
                return Err(Error::invalid(format!(
                    "Expected '=' after parameter '{item}'"
                )));
            }
        };
        let mut node = &mut root;
        let parts: Vec<&str> = key.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            let entry = node
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            node = match entry {
                Value::Object(map) => map,
                _ => {
                    return Err(Error::invalid(format!(
                        "Parameter '{key}' conflicts with '{part}'"
                    )));
                }
            };
        }
        let last = parts[parts.len() - 1].to_string();
        if node.contains_key(&last) {
            return Err(Error::invalid(format!("Parameter '{key}' is given twice")));
        }
        node.insert(last, Value::String(value));
    }
    Ok(root)
}

/// The members of one JSON object being parsed, and the path that names them in
/// errors (`"file."` for an inline child). Public so the QMP layer parses command
/// arguments with the same words.
pub struct Members {
    map: Map<String, Value>,
    prefix: String,
    /// Values came from QEMU's dotted key=value form, where every value is a string:
    /// integers and booleans ("on"/"off") are then accepted as strings.
    keyval: bool,
}

impl Members {
    /// Members of `map`, named in errors as `prefix` + key.
    pub fn new(map: Map<String, Value>, prefix: String) -> Self {
        Self {
            map,
            prefix,
            keyval: false,
        }
    }

    /// Members parsed from the dotted key=value form (see [`parse_keyval`]).
    pub fn keyval(map: Map<String, Value>) -> Self {
        Self {
            map,
            prefix: String::new(),
            keyval: true,
        }
    }

    /// Takes `key` if present, converting it with `visit`.
    pub fn optional<T>(
        &mut self,
        key: &str,
        visit: impl FnOnce(&Self, &str, Value) -> Result<T>,
    ) -> Result<Option<T>> {
        match self.map.remove(key) {
            Some(value) => visit(self, key, value).map(Some),
            None => Ok(None),
        }
    }

    /// Takes `key`, which must be present.
    pub fn required<T>(
        &mut self,
        key: &str,
        visit: impl FnOnce(&Self, &str, Value) -> Result<T>,
    ) -> Result<T> {
        self.optional(key, visit)?
            .ok_or_else(|| Error::invalid(format!("Parameter '{}{key}' is missing", self.prefix)))
    }

    /// Refuses members nobody consumed ("Parameter 'x' is unexpected").
    pub fn finish(self) -> Result<()> {
        match self.map.keys().next() {
            Some(key) => Err(Error::invalid(format!(
                "Parameter '{}{key}' is unexpected",
                self.prefix
            ))),
            None => Ok(()),
        }
    }

    /// "Invalid parameter type for 'x', expected: ...".
    pub fn type_error(&self, key: &str, expected: &str) -> Error {
        Error::invalid(format!(
            "Invalid parameter type for '{}{key}', expected: {expected}",
            self.prefix
        ))
    }

    /// A string member.
    pub fn string(&self, key: &str, value: Value) -> Result<String> {
        match value {
            Value::String(s) => Ok(s),
            _ => Err(self.type_error(key, "string")),
        }
    }

    /// A boolean member.
    pub fn boolean(&self, key: &str, value: Value) -> Result<bool> {
        match (&value, self.keyval) {
            (Value::String(s), true) if s == "on" || s == "true" => Ok(true),
            (Value::String(s), true) if s == "off" || s == "false" => Ok(false),
            _ => value
                .as_bool()
                .ok_or_else(|| self.type_error(key, "boolean")),
        }
    }

    /// A non-negative integer member.
    pub fn unsigned(&self, key: &str, value: Value) -> Result<u64> {
        if let (Value::String(s), true) = (&value, self.keyval) {
            return s.parse().map_err(|_| self.type_error(key, "integer"));
        }
        match &value {
            Value::Number(n) if n.is_u64() => Ok(n.as_u64().unwrap()),
            Value::Number(n) if n.is_i64() => Err(Error::invalid(format!(
                "Parameter '{}{key}' expects a non-negative value",
                self.prefix
            ))),
            _ => Err(self.type_error(key, "integer")),
        }
    }

    /// The members not taken yet, for a command that hands the rest to another
    /// command's parser (`drive-backup` to `blockdev-backup`'s).
    pub fn into_map(self) -> Map<String, Value> {
        self.map
    }

    /// A `uint32` member, with the messages of QEMU's QObject input visitor (QMP
    /// command arguments, and the copy-before-write driver's options): "expects
    /// uint32_t" for a number out of range, "expects uint64" for anything else.
    pub fn uint32(&self, key: &str, value: Value) -> Result<u32> {
        match integer(self, &value) {
            Some(n) => u32::try_from(n).map_err(|_| {
                Error::invalid(format!("Parameter '{}{key}' expects uint32_t", self.prefix))
            }),
            None => Err(Error::invalid(format!(
                "Parameter '{}{key}' expects uint64",
                self.prefix
            ))),
        }
    }

    /// How members are named in errors: `""` at the top, `"file."` for an inline child.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// An object member, parsed with a prefix of its own.
    pub fn object(&self, key: &str, value: Value) -> Result<Members> {
        match value {
            Value::Object(map) => Ok(Members {
                map,
                prefix: format!("{}{key}.", self.prefix),
                keyval: self.keyval,
            }),
            _ => Err(self.type_error(key, "object")),
        }
    }

    /// A string member from a fixed set ("Parameter 'x' does not accept value 'y'").
    pub fn enumeration(&self, key: &str, value: Value, allowed: &[&str]) -> Result<String> {
        let s = self.string(key, value)?;
        if allowed.contains(&s.as_str()) {
            Ok(s)
        } else {
            Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "Parameter '{}{key}' does not accept value '{s}'",
                    self.prefix
                ),
            ))
        }
    }
}

/// An integer: a JSON number, or in the dotted key=value form a decimal string.
pub(crate) fn integer(m: &Members, value: &Value) -> Option<i128> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::String(text) if m.keyval => text.parse().ok(),
        _ => None,
    }
}
