//! Sizes (`512M`, `4G`, `1.5GiB`) and durations (`90s`, `5m`, `1h30m`) as people write them.

/// Parses a size in bytes. Suffixes are binary (K = 1024): `K`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB`; a plain number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (try 512M or 4G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use K, M, G or T)"
            ));
        }
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration in milliseconds (`90s`, `5m`, `1h30m`, `250ms`; a plain number is
/// seconds).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return secs
            .checked_mul(1_000)
            .ok_or_else(|| format!("{text:?} is out of range"));
    }
    humantime::parse_duration(t)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .map_err(|e| format!("{text:?} is not a duration ({e}); try 90s, 5m or 1h30m"))
}

/// Parses a signed duration in milliseconds: a duration as [`parse_duration_ms`] takes,
/// optionally after `-` or `+` (`-250ms`).
pub fn parse_signed_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (negative, rest) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let ms =
        i64::try_from(parse_duration_ms(rest)?).map_err(|_| format!("{text:?} is out of range"))?;
    Ok(if negative { -ms } else { ms })
}

/// Parses `k=v`.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not a label; write key=value")),
    }
}

/// Parses a CPU count (`2`, `0.5`) into thousandths of a core.
pub fn parse_cpus(text: &str) -> Result<u32, String> {
    let n: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of CPUs (try 1, 2 or 0.5)"))?;
    if !(0.0..=1_000_000.0).contains(&n) || n.is_nan() {
        return Err(format!("{text:?} CPUs is out of range"));
    }
    Ok((n * 1_000.0).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("7"), Ok(7_000));
        assert!(parse_duration_ms("soon").is_err());
        assert_eq!(parse_signed_duration_ms("-250ms"), Ok(-250));
        assert_eq!(parse_signed_duration_ms("+1s"), Ok(1_000));
        assert_eq!(parse_signed_duration_ms("40ms"), Ok(40));
        assert!(parse_signed_duration_ms("--1s").is_err());
    }

    #[test]
    fn labels_and_cpus() {
        assert_eq!(parse_label("zone=a"), Ok(("zone".into(), "a".into())));
        assert!(parse_label("zone").is_err());
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert_eq!(parse_cpus("2"), Ok(2_000));
        assert!(parse_cpus("lots").is_err());
    }
}
