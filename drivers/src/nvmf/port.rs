//! `trsvcid`, an NVMe/TCP port, as the RPC methods take it: a number (`4420`) or, as SPDK's
//! rpc.py sends it, a string (`"4420"`).

use serde::de::{self, Deserializer, Visitor};

/// What a valid port is, for error messages.
const EXPECTED: &str = "a port number from 1 to 65535";

/// The port `s` names: decimal digits only, 1 to 65535.
pub fn parse(s: &str) -> Result<u16, String> {
    let port = match s.bytes().all(|b| b.is_ascii_digit()) {
        true => s.parse::<u16>().ok().filter(|&p| p != 0),
        false => None,
    };
    port.ok_or_else(|| format!("'{s}' is not {EXPECTED}"))
}

fn from_number(n: u64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{n} is not {EXPECTED}"))
}

struct PortVisitor;

impl<'de> Visitor<'de> for PortVisitor {
    type Value = Option<u16>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{EXPECTED}, as a number or a string")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        from_number(n).map(Some).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom(format!("{n} is not {EXPECTED}"))),
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        parse(s).map(Some).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// Deserializes an optional `trsvcid` from a number or a string (`null` or absent: none), for
/// `#[serde(default, deserialize_with = "...")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    d.deserialize_any(PortVisitor)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    struct P {
        #[serde(default, deserialize_with = "super::deserialize")]
        trsvcid: Option<u16>,
    }

    fn port(v: serde_json::Value) -> Result<Option<u16>, String> {
        serde_json::from_value::<P>(v)
            .map(|p| p.trsvcid)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_number_or_a_string_of_digits_within_the_port_range() {
        assert_eq!(port(json!({"trsvcid": 4420})), Ok(Some(4420)));
        assert_eq!(port(json!({"trsvcid": "4420"})), Ok(Some(4420)));
        assert_eq!(port(json!({"trsvcid": "65535"})), Ok(Some(65535)));
        assert_eq!(port(json!({"trsvcid": null})), Ok(None));
        assert_eq!(port(json!({})), Ok(None));
        for bad in [
            json!("abc"),
            json!("70000"),
            json!("0"),
            json!(""),
            json!(" 4420"),
            json!("+4420"),
            json!("44.20"),
            json!(70000),
            json!(0),
            json!(-1),
            json!(4420.5),
            json!(true),
        ] {
            let err = port(json!({ "trsvcid": bad })).expect_err("refused");
            assert!(err.contains("port number from 1 to 65535"), "{bad}: {err}");
        }
        assert!(port(json!({"trsvcid": "abc"}))
            .expect_err("refused")
            .contains("'abc'"));
    }
}
