//! Where in the YAML text a field path is: a second parse, into a tree of nodes that carry their
//! location, done only when a spec has problems, so that each problem names its line.

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A YAML node: a mapping or a sequence of located nodes, or a scalar.
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = m.next_key::<serde_json::Value>()? {
                    let key = match key {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    out.push((key, m.next_value::<Spanned<Node>>()?));
                }
                Ok(Node::Map(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = s.next_element::<Spanned<Node>>()? {
                    out.push(item);
                }
                Ok(Node::Seq(out))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Node, D2::Error> {
                Node::deserialize(d)
            }
        }
        d.deserialize_any(V)
    }
}

/// Line and column (1-based) of every field path in `text`, in the validator's notation
/// (`recipe.stages[1].params.k`); empty if the text does not parse.
pub(super) fn locations(text: &str, options: serde_saphyr::Options) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    if let Ok(root) = serde_saphyr::from_str_with_options::<Spanned<Node>>(text, options) {
        walk(&root, "", &mut out);
    }
    out
}

fn walk(node: &Spanned<Node>, path: &str, out: &mut HashMap<String, (u64, u64)>) {
    let at = node.referenced;
    out.insert(path.to_string(), (at.line(), at.column()));
    match &node.value {
        Node::Map(entries) => {
            for (key, value) in entries {
                let p = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                walk(value, &p, out);
            }
        }
        Node::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, &format!("{path}[{i}]"), out);
            }
        }
        Node::Leaf => {}
    }
}

/// The location of `path`, or of its nearest ancestor that has one.
pub(super) fn find(locations: &HashMap<String, (u64, u64)>, path: &str) -> Option<(u64, u64)> {
    let mut p = path;
    loop {
        if let Some(l) = locations.get(p) {
            return Some(*l);
        }
        let cut = p.rfind(['.', '['])?;
        p = &p[..cut];
    }
}
