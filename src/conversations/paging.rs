//! Cursor paging as OpenAI's list routes do it: `after` (an id), `limit` (1–100, default 20),
//! `order` (`asc` | `desc`) → `{"object": "list", data, first_id, last_id, has_more}`.
//!
//! An `after` id that is not in the list is 400 `invalid_value` naming `after` (nothing changes);
//! so are a `limit` outside 1–100 and an `order` other than `asc`/`desc`.

use serde_json::{Value, json};

use crate::error::ApiError;

pub const DEFAULT_LIMIT: u64 = 20;
pub const MAX_LIMIT: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// A list route's `after`, `limit`, `order`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListParams {
    pub after: Option<String>,
    pub limit: u64,
    pub order: Order,
}

impl ListParams {
    /// From the query's pairs (other pairs are the route's own, e.g. `model`, `metadata[k]`).
    /// `default_order` is the route's: `desc` for conversation items and input items, `asc`
    /// for stored chat completions and their messages (as OpenAI).
    pub fn parse(query: &[(String, String)], default_order: Order) -> Result<Self, ApiError> {
        let mut p = ListParams {
            after: None,
            limit: DEFAULT_LIMIT,
            order: default_order,
        };
        for (k, v) in query {
            match k.as_str() {
                "after" if !v.is_empty() => p.after = Some(v.clone()),
                "limit" => {
                    p.limit = v
                        .parse::<u64>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid_param(
                                "limit",
                                format!("Invalid 'limit': expected an integer between 1 and {MAX_LIMIT}, got '{}'.", truncated(v)),
                            )
                        })?;
                }
                "order" => {
                    p.order = match v.as_str() {
                        "asc" => Order::Asc,
                        "desc" => Order::Desc,
                        _ => {
                            return Err(ApiError::invalid_param(
                                "order",
                                format!(
                                    "Invalid 'order': expected 'asc' or 'desc', got '{}'.",
                                    truncated(v)
                                ),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(p)
    }
}

/// The 400 of an `after` id not in the list.
pub fn unknown_after(after: &str) -> ApiError {
    ApiError::invalid_param(
        "after",
        format!(
            "Invalid 'after': no object with id '{}' in this list.",
            truncated(after)
        ),
    )
}

/// `limit + 1` rows were asked for: the first `limit` are the page, one more means `has_more`.
pub fn list_object(mut data: Vec<Value>, limit: u64, id_of: impl Fn(&Value) -> &str) -> Value {
    let has_more = data.len() as u64 > limit;
    data.truncate(limit as usize);
    let first_id = data.first().map(|v| id_of(v).to_owned());
    let last_id = data.last().map(|v| id_of(v).to_owned());
    json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    })
}

/// A client's string, cut for an error message.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_and_refuses() {
        let p = ListParams::parse(&q(&[]), Order::Desc).unwrap();
        assert_eq!((p.limit, p.order, p.after), (20, Order::Desc, None));
        let p = ListParams::parse(
            &q(&[("limit", "100"), ("order", "asc"), ("after", "msg_1")]),
            Order::Desc,
        )
        .unwrap();
        assert_eq!(
            (p.limit, p.order, p.after.as_deref()),
            (100, Order::Asc, Some("msg_1"))
        );
        for bad in [
            ("limit", "0"),
            ("limit", "101"),
            ("limit", "-1"),
            ("limit", "x"),
            ("order", "up"),
        ] {
            let e = ListParams::parse(&q(&[bad]), Order::Asc).unwrap_err();
            assert!(
                matches!(&e, ApiError::BadRequest { param: Some(p), .. } if p == bad.0),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn list_object_shape() {
        fn id(v: &Value) -> &str {
            v["id"].as_str().unwrap_or_default()
        }
        let v = list_object(
            vec![json!({"id": "a"}), json!({"id": "b"}), json!({"id": "c"})],
            2,
            id,
        );
        assert_eq!(v["has_more"], true);
        assert_eq!(v["first_id"], "a");
        assert_eq!(v["last_id"], "b");
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        let e = list_object(vec![], 2, id);
        assert_eq!(e["has_more"], false);
        assert!(e["first_id"].is_null());
    }
}
