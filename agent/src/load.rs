//! Reading a match server's load from its stats URL: JSON
//! (`{"connections": N, "matches": M}`) or Prometheus text (the first
//! unlabelled-or-labelled sample whose name is `connections`/`matches` or
//! ends in `_connections`/`_matches`).

/// What one scrape found; a figure the server does not publish stays `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub connections: Option<u64>,
    pub matches: Option<u64>,
}

pub fn parse(body: &[u8]) -> Result<Load, String> {
    let text = std::str::from_utf8(body).map_err(|_| "stats body is not UTF-8".to_owned())?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(trimmed).map_err(|e| format!("stats JSON: {e}"))?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).map(|f| f.max(0.0) as u64);
        let load = Load {
            connections: num("connections"),
            matches: num("matches"),
        };
        if load.connections.is_none() && load.matches.is_none() {
            return Err("stats JSON has neither \"connections\" nor \"matches\"".into());
        }
        return Ok(load);
    }
    let mut load = Load::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = match line.rsplit_once(char::is_whitespace) {
            Some(p) => p,
            None => continue,
        };
        let name = name_labels.split(['{', ' ']).next().unwrap_or(name_labels);
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let v = v.max(0.0) as u64;
        let is = |suffix: &str| name == suffix || name.ends_with(&format!("_{suffix}"));
        if is("connections") && load.connections.is_none() {
            load.connections = Some(v);
        } else if is("matches") && load.matches.is_none() {
            load.matches = Some(v);
        }
    }
    if load == Load::default() {
        return Err("no connections or matches sample in the stats text".into());
    }
    Ok(load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_prometheus_text() {
        assert_eq!(
            parse(br#"{"server":"s1","connections":12,"matches":3}"#).unwrap(),
            Load {
                connections: Some(12),
                matches: Some(3)
            }
        );
        let text = "# HELP game_connections open\n# TYPE game_connections gauge\ngame_connections 40\ngame_matches{region=\"eu\"} 4\n";
        assert_eq!(
            parse(text.as_bytes()).unwrap(),
            Load {
                connections: Some(40),
                matches: Some(4)
            }
        );
        assert!(parse(b"{}").is_err());
        assert!(parse(b"garbage").is_err());
    }
}
