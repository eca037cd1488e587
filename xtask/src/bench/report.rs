//! Numbers to text: medians, a minimal JSON writer, aligned tables.

use std::fmt::{self, Write as _};

/// The median of `v` (mean of the middle two for an even count); NaN if
/// empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Median of the element-wise ratios `a[i] / b[i]` (runs paired by
/// repetition, so that slow phases of a noisy machine cancel).
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&r)
}

/// A JSON value (only what the reports need).
#[derive(Debug, Clone)]
pub enum Json {
    /// `true` / `false`
    Bool(bool),
    /// A number (non-finite values are written as `null`).
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, keys in insertion order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// An object from `(key, value)` pairs.
    pub fn obj<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
    /// An array of numbers.
    pub fn nums(v: &[f64]) -> Json {
        Json::Arr(v.iter().map(|&x| Json::Num(x)).collect())
    }
    /// A string.
    pub fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
        match self {
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(x) if x.is_finite() => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    let _ = write!(out, "{}", *x as i64);
                } else {
                    let _ = write!(out, "{x}");
                }
            }
            Json::Num(_) => out.push_str("null"),
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(v) => {
                // Arrays of scalars on one line, others one item a line.
                let flat = v.iter().all(|j| !matches!(j, Json::Arr(_) | Json::Obj(_)));
                out.push('[');
                for (i, j) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    if flat {
                        if i > 0 {
                            out.push(' ');
                        }
                    } else {
                        out.push('\n');
                        pad(out, indent + 2);
                    }
                    j.write(out, indent + 2);
                }
                if !flat && !v.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push(']');
            }
            Json::Obj(kv) => {
                out.push('{');
                for (i, (k, v)) in kv.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('\n');
                    pad(out, indent + 2);
                    Json::Str(k.clone()).write(out, indent + 2);
                    out.push_str(": ");
                    v.write(out, indent + 2);
                }
                if !kv.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push('}');
            }
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        self.write(&mut s, 0);
        f.write_str(&s)
    }
}

/// A text table with right-aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headings.
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }
    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cols = self.head.len();
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, r: &[String]| -> fmt::Result {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .take(cols)
                .map(|(i, c)| format!("{c:>w$}", w = w[i]))
                .collect();
            writeln!(f, "  {}", cells.join("  "))
        };
        line(f, &self.head)?;
        let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
        writeln!(f, "  {}", rule.join("  "))?;
        for r in &self.rows {
            line(f, r)?;
        }
        Ok(())
    }
}

/// `bytes` as a short size: `4K`, `64K`, `1M`, `1.5M`, `512`.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

/// A throughput in MB/s (10^6), no decimals.
pub fn mbps(bytes_per_sec: f64) -> String {
    if bytes_per_sec.is_nan() {
        "-".into()
    } else {
        format!("{:.0}", bytes_per_sec / 1e6)
    }
}

/// A ratio with two decimals.
pub fn ratio(r: f64) -> String {
    if r.is_nan() {
        "-".into()
    } else {
        format!("{r:.2}")
    }
}

/// A float with `d` decimals, `-` for NaN.
pub fn fixed(x: f64, d: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.d$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(paired_ratio(&[2.0, 9.0, 4.0], &[1.0, 3.0, 4.0]), 2.0);
    }

    #[test]
    fn json_text() {
        let j = Json::obj([
            ("a", Json::Num(1.0)),
            ("b", Json::nums(&[1.5, f64::NAN])),
            ("c", Json::str("q\"\n")),
            ("d", Json::Arr(vec![Json::obj([("x", Json::Bool(true))])])),
        ]);
        assert_eq!(
            j.to_string(),
            "{\n  \"a\": 1,\n  \"b\": [1.5, null],\n  \"c\": \"q\\\"\\n\",\n  \"d\": [\n    {\n      \"x\": true\n    }\n  ]\n}"
        );
    }

    #[test]
    fn sizes_and_table() {
        assert_eq!(size(4096), "4K");
        assert_eq!(size(1 << 20), "1M");
        assert_eq!(size(1 << 30), "1G");
        assert_eq!(size(100), "100");
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["123".into(), "1".into()]);
        assert_eq!(t.to_string(), "    a  bb\n  ---  --\n  123   1\n");
    }
}
