//! Kubernetes resource quantities ("500m", "2", "1Gi"): parsing and comparison for job caps.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A validated quantity string with its value in milli-units (for comparison only).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    text: String,
    milli: f64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 4G)")]
pub struct QuantityError(pub String);

impl Quantity {
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let t = text.trim();
        let err = || QuantityError(text.to_string());
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        if num.is_empty() || num.starts_with('.') || num.matches('.').count() > 1 {
            return Err(err());
        }
        let n: f64 = num.parse().map_err(|_| err())?;
        let factor: f64 = match suffix {
            "" => 1.0,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "Ki" => 1024.0,
            "Mi" => 1024.0 * 1024.0,
            "Gi" => 1024.0 * 1024.0 * 1024.0,
            "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return Err(err()),
        };
        Ok(Self {
            text: t.to_string(),
            milli: n * factor * 1000.0,
        })
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `self` is more than `cap`.
    #[must_use]
    pub fn exceeds(&self, cap: &Quantity) -> bool {
        self.milli > cap.milli * (1.0 + 1e-12)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Quantity::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_across_suffixes() {
        let q = |s| Quantity::parse(s).unwrap();
        assert!(q("2").exceeds(&q("1500m")));
        assert!(!q("1500m").exceeds(&q("1.5")));
        assert!(q("3Gi").exceeds(&q("3G")));
        assert!(!q("1024Mi").exceeds(&q("1Gi")));
        assert!(q("1025Mi").exceeds(&q("1Gi")));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "lots", "1.2.3", "5X", "-1", ".5"] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
    }
}
