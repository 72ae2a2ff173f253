//! Names: `POOL`, `POOL/VOLUME`, `POOL/VOLUME@SNAPSHOT`. Each component starts with a
//! letter or digit, then letters, digits, `_ . : + -`; at most 128 bytes.

use std::fmt;

use crate::error::{CatalogError, Result};

pub const MAX_COMPONENT: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name {
    pub pool: String,
    pub volume: Option<String>,
    pub snapshot: Option<String>,
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pool)?;
        if let Some(v) = &self.volume {
            write!(f, "/{v}")?;
        }
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// Check one component; `what` names it in the error.
pub fn check_component(c: &str, what: &str, full: &str) -> Result<()> {
    let bad = |reason: String| CatalogError::BadName {
        name: full.to_string(),
        reason,
    };
    if c.is_empty() {
        return Err(bad(format!("the {what} name is empty")));
    }
    if c.len() > MAX_COMPONENT {
        return Err(bad(format!(
            "the {what} name is longer than {MAX_COMPONENT} bytes"
        )));
    }
    let first = c.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(bad(format!(
            "the {what} name must start with a letter or digit"
        )));
    }
    if let Some(ch) = c
        .chars()
        .find(|ch| !(ch.is_ascii_alphanumeric() || "_.:+-".contains(*ch)))
    {
        return Err(bad(format!(
            "'{ch}' is not allowed in a {what} name (letters, digits, _ . : + - only)"
        )));
    }
    Ok(())
}

impl Name {
    pub fn parse(s: &str) -> Result<Name> {
        let (head, snap) = match s.split_once('@') {
            Some((h, sn)) => (h, Some(sn)),
            None => (s, None),
        };
        let (pool, vol) = match head.split_once('/') {
            Some((p, v)) => (p, Some(v)),
            None => (head, None),
        };
        check_component(pool, "pool", s)?;
        if let Some(v) = vol {
            check_component(v, "volume", s)?;
        }
        if let Some(sn) = snap {
            if vol.is_none() {
                return Err(CatalogError::BadName {
                    name: s.into(),
                    reason: "a snapshot name needs a volume: POOL/VOLUME@SNAPSHOT".into(),
                });
            }
            check_component(sn, "snapshot", s)?;
        }
        Ok(Name {
            pool: pool.into(),
            volume: vol.map(Into::into),
            snapshot: snap.map(Into::into),
        })
    }

    pub fn pool(s: &str) -> Result<String> {
        check_component(s, "pool", s)?;
        Ok(s.to_string())
    }

    /// `POOL/VOLUME` only.
    pub fn parse_volume(s: &str) -> Result<Name> {
        let n = Name::parse(s)?;
        if n.volume.is_none() || n.snapshot.is_some() {
            return Err(CatalogError::BadName {
                name: s.into(),
                reason: "expected POOL/VOLUME".into(),
            });
        }
        Ok(n)
    }

    /// `POOL/VOLUME@SNAPSHOT` only.
    pub fn parse_snapshot(s: &str) -> Result<Name> {
        let n = Name::parse(s)?;
        if n.snapshot.is_none() {
            return Err(CatalogError::BadName {
                name: s.into(),
                reason: "expected POOL/VOLUME@SNAPSHOT".into(),
            });
        }
        Ok(n)
    }

    pub fn vol(&self) -> &str {
        self.volume.as_deref().unwrap_or("")
    }

    pub fn snap(&self) -> &str {
        self.snapshot.as_deref().unwrap_or("")
    }
}

/// Levenshtein distance, for suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j + 1] + 1)
                .min(cur[j] + 1)
                .min(prev[j] + usize::from(ca != *cb));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// " (did you mean 'x' or 'y'?)" for the nearest candidates, or "".
pub fn suggest<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| (distance(wanted, c), c))
        .filter(|(d, c)| {
            *d <= 2.max(wanted.len() / 3) || c.starts_with(wanted) || wanted.starts_with(c)
        })
        .collect();
    scored.sort();
    let picks: Vec<String> = scored
        .iter()
        .take(3)
        .map(|(_, c)| format!("'{c}'"))
        .collect();
    match picks.len() {
        0 => String::new(),
        1 => format!(" (did you mean {}?)", picks[0]),
        _ => format!(" (did you mean {}?)", picks.join(" or ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_reject() {
        let n = Name::parse("tank/vm1@daily-1").unwrap();
        assert_eq!(
            (n.pool.as_str(), n.vol(), n.snap()),
            ("tank", "vm1", "daily-1")
        );
        assert_eq!(n.to_string(), "tank/vm1@daily-1");
        assert!(Name::parse("tank@x").is_err());
        assert!(Name::parse("tank/").is_err());
        assert!(Name::parse("tank/a b").is_err());
        assert!(Name::parse("-x").is_err());
        assert!(Name::parse_volume("tank/v@s").is_err());
        assert!(Name::parse_snapshot("tank/v").is_err());
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("vm01", ["vm1", "db", "vm2"]),
            " (did you mean 'vm1' or 'vm2'?)"
        );
        assert_eq!(suggest("zzzzzz", ["vm1"]), "");
    }
}
