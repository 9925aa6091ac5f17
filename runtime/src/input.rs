//! Request bodies, parsed in one pass straight into per-field slots.
//!
//! An endpoint knows in advance which fields it reads (model features,
//! enrichment keys, lookup keys): a [`FieldMap`] gives each one a slot. The
//! parser walks `{"features": {...}}` (or `{"data": {...}}`, or a list of
//! them under `"items"`), stores the fields it knows and skips the others
//! without building them, borrowing strings from the body where it can.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::dataset::{KeyRef, ValueRef};

/// A value of a field: sent by the caller, or filled by an enrichment.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<'a> {
    /// Not sent (an explicit JSON `null` from the caller counts as not sent).
    Absent,
    /// A missing value filled by an enrichment (a null cell, or no row with
    /// `on_missing = "null"`).
    Null,
    Int(i64),
    Num(f64),
    Bool(bool),
    Str(Cow<'a, str>),
    /// An array or an object: never a valid feature.
    Other(&'static str),
}

impl<'a> Input<'a> {
    /// JSON type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Input::Absent => "nothing",
            Input::Null => "null",
            Input::Int(_) | Input::Num(_) => "a number",
            Input::Bool(_) => "a boolean",
            Input::Str(_) => "a string",
            Input::Other(kind) => kind,
        }
    }

    /// The value as a lookup key (strings and integers only).
    pub fn as_key(&self) -> Option<KeyRef<'_>> {
        match self {
            Input::Str(s) => Some(KeyRef::Str(s)),
            Input::Int(i) => Some(KeyRef::Int(*i)),
            _ => None,
        }
    }

    pub fn from_value(value: ValueRef<'a>) -> Input<'a> {
        match value {
            ValueRef::Null => Input::Null,
            ValueRef::Int(v) => Input::Int(v),
            ValueRef::Float(v) => Input::Num(v),
            ValueRef::Bool(v) => Input::Bool(v),
            ValueRef::Str(v) => Input::Str(Cow::Borrowed(v)),
        }
    }

    /// A value from a JSON document (remote lookups). `null` is a missing value.
    pub fn from_json(value: &serde_json::Value) -> Input<'static> {
        match value {
            serde_json::Value::Null => Input::Null,
            serde_json::Value::Bool(b) => Input::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Input::Int(i),
                None => n.as_f64().map_or(Input::Other("a number"), Input::Num),
            },
            serde_json::Value::String(s) => Input::Str(Cow::Owned(s.clone())),
            serde_json::Value::Array(_) => Input::Other("an array"),
            serde_json::Value::Object(_) => Input::Other("an object"),
        }
    }
}

/// Field name → slot, fixed per endpoint at start.
#[derive(Debug, Clone, Default)]
pub struct FieldMap {
    slots: hashbrown::HashMap<Box<str>, usize>,
    names: Vec<String>,
}

impl FieldMap {
    /// Slot of `name`, adding it if new.
    pub fn add(&mut self, name: &str) -> usize {
        if let Some(&slot) = self.slots.get(name) {
            return slot;
        }
        let slot = self.names.len();
        self.slots.insert(name.into(), slot);
        self.names.push(name.to_string());
        slot
    }

    pub fn get(&self, name: &str) -> Option<usize> {
        self.slots.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, slot: usize) -> &str {
        &self.names[slot]
    }
}

/// Why a body could not be parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseError {
    /// Not JSON.
    Malformed(String),
    /// JSON of the wrong shape.
    Invalid(String),
    /// More than `max_batch` items.
    TooMany(usize),
}

/// Parses `{"<wrapper>": {...}}` into one slot per field.
pub fn parse_one<'de>(
    body: &'de [u8],
    wrapper: &'static str,
    fields: &FieldMap,
) -> Result<Vec<Input<'de>>, ParseError> {
    let mut out = vec![Input::Absent; fields.len()];
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = ItemSeed {
        wrapper,
        fields,
        out: &mut out,
    };
    match seed.deserialize(&mut de).and_then(|()| de.end()) {
        Ok(()) => Ok(out),
        Err(e) => Err(classify(e)),
    }
}

/// Parses `{"items": [{"<wrapper>": {...}}, ...]}` into `items * fields`
/// slots (row-major). Returns the slots and the number of items.
pub fn parse_many<'de>(
    body: &'de [u8],
    wrapper: &'static str,
    fields: &FieldMap,
    max_batch: usize,
) -> Result<(Vec<Input<'de>>, usize), ParseError> {
    let mut out = Vec::new();
    let mut count = (0usize, false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = BatchSeed {
        wrapper,
        fields,
        max_batch,
        out: &mut out,
        count: &mut count,
    };
    let result = seed.deserialize(&mut de).and_then(|()| de.end());
    if count.1 {
        return Err(ParseError::TooMany(max_batch));
    }
    match result {
        Ok(()) => Ok((out, count.0)),
        Err(e) => Err(classify(e)),
    }
}

fn classify(e: serde_json::Error) -> ParseError {
    match e.classify() {
        serde_json::error::Category::Data => ParseError::Invalid(e.to_string()),
        _ => ParseError::Malformed(e.to_string()),
    }
}

/// `{"<wrapper>": {...}, ...}`: one item.
struct ItemSeed<'f, 'o, 'de> {
    wrapper: &'static str,
    fields: &'f FieldMap,
    out: &'o mut [Input<'de>],
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_, '_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object with a `{}` object", self.wrapper)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(Key(key)) = map.next_key()? {
            if key == self.wrapper {
                map.next_value_seed(FieldsSeed {
                    fields: self.fields,
                    out: &mut *self.out,
                })?;
                seen = true;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            return Err(de::Error::custom(format_args!(
                "missing `{}` object",
                self.wrapper
            )));
        }
        Ok(())
    }
}

/// The fields object: known fields into slots, others skipped.
struct FieldsSeed<'f, 'o, 'de> {
    fields: &'f FieldMap,
    out: &'o mut [Input<'de>],
}

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_, '_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            match self.fields.get(&key) {
                Some(slot) => self.out[slot] = map.next_value::<InputDe<'de>>()?.0,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// `{"items": [...]}`.
struct BatchSeed<'f, 'o, 'de> {
    wrapper: &'static str,
    fields: &'f FieldMap,
    max_batch: usize,
    out: &'o mut Vec<Input<'de>>,
    /// Items seen, and whether the limit was passed.
    count: &'o mut (usize, bool),
}

impl<'de> DeserializeSeed<'de> for BatchSeed<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed<'_, '_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with an `items` list")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(Key(key)) = map.next_key()? {
            if key == "items" {
                map.next_value_seed(ItemsSeed {
                    wrapper: self.wrapper,
                    fields: self.fields,
                    max_batch: self.max_batch,
                    out: &mut *self.out,
                    count: &mut *self.count,
                })?;
                seen = true;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            return Err(de::Error::custom("missing `items` list"));
        }
        Ok(())
    }
}

struct ItemsSeed<'f, 'o, 'de> {
    wrapper: &'static str,
    fields: &'f FieldMap,
    max_batch: usize,
    out: &'o mut Vec<Input<'de>>,
    /// Items seen, and whether the limit was passed.
    count: &'o mut (usize, bool),
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_, '_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of items")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let width = self.fields.len();
        loop {
            let start = self.out.len();
            self.out.resize(start + width, Input::Absent);
            let seed = ItemSeed {
                wrapper: self.wrapper,
                fields: self.fields,
                out: &mut self.out[start..],
            };
            if seq.next_element_seed(seed)?.is_none() {
                self.out.truncate(start);
                return Ok(());
            }
            self.count.0 += 1;
            if self.count.0 > self.max_batch {
                self.count.1 = true;
                return Err(de::Error::custom("too many items"));
            }
        }
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// One field value.
struct InputDe<'de>(Input<'de>);

impl<'de> de::Deserialize<'de> for InputDe<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputDe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Int(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(InputDe(match i64::try_from(v) {
                    Ok(i) => Input::Int(i),
                    Err(_) => Input::Num(v as f64),
                }))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Num(v)))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Str(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Str(Cow::Owned(v.to_string()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Str(Cow::Owned(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Absent))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(InputDe(Input::Absent))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(InputDe(Input::Other("an array")))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(InputDe(Input::Other("an object")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> FieldMap {
        let mut f = FieldMap::default();
        f.add("age");
        f.add("gender");
        f
    }

    #[test]
    fn one_item() {
        let body =
            br#"{"features": {"zzz": [1, {"a": 2}], "age": 34, "gender": "F\u0041"}, "x": 1}"#;
        let out = parse_one(body, "features", &fields()).expect("parses");
        assert_eq!(out, vec![Input::Int(34), Input::Str("FA".into())]);
        let out = parse_one(br#"{"features": {"age": null}}"#, "features", &fields()).expect("ok");
        assert_eq!(out, vec![Input::Absent, Input::Absent]);
    }

    #[test]
    fn bad_bodies() {
        let f = fields();
        assert!(matches!(
            parse_one(b"{", "features", &f),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse_one(b"[]", "features", &f),
            Err(ParseError::Invalid(_))
        ));
        assert!(
            matches!(parse_one(b"{}", "features", &f), Err(ParseError::Invalid(m)) if m.contains("missing `features`"))
        );
        assert!(matches!(
            parse_one(br#"{"features": 1}"#, "features", &f),
            Err(ParseError::Invalid(_))
        ));
        assert!(matches!(
            parse_one(br#"{"features": {}} x"#, "features", &f),
            Err(ParseError::Malformed(_))
        ));
        assert!(parse_one(br#"{"features": {"age": 1e999}}"#, "features", &f).is_err());
    }

    #[test]
    fn many_items_and_limit() {
        let f = fields();
        let body = br#"{"items": [{"features": {"age": 1}}, {"features": {"gender": "M"}}]}"#;
        let (out, n) = parse_many(body, "features", &f, 10).expect("parses");
        assert_eq!(n, 2);
        assert_eq!(out[0], Input::Int(1));
        assert_eq!(out[3], Input::Str("M".into()));
        assert_eq!(
            parse_many(body, "features", &f, 1),
            Err(ParseError::TooMany(1))
        );
        let (_, n) = parse_many(br#"{"items": []}"#, "features", &f, 1).expect("empty");
        assert_eq!(n, 0);
    }
}
