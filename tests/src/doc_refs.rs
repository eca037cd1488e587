//! Checks that every `§` reference in the repository points at a section
//! (and, where it says so, a table row or list item) that exists in
//! `docs/vchan.md` or `docs/qrexec.md`. The convention is in
//! `docs/README.md`:
//!
//! * a reference names its document before the `§` on the same line:
//!   `docs/vchan.md §5.4`; further `§` on that line belong to the last
//!   document named before them (`docs/vchan.md §8.2, §16 row 9c`);
//! * inside `docs/vchan.md` and `docs/qrexec.md` a `§` before any document
//!   name on its line means that same document;
//! * `§N row X`, `§N rows X–Y`: a table row of section N whose first cell
//!   starts with `X`; `§N item K`, `step K`, `rule K`: a numbered list item
//!   of section N.
//!
//! ```
//! use tests::doc_refs::{DocIndex, check_text};
//! let doc = DocIndex::parse("## 5. Rings\n### 5.4 Notify\n1. first\n| 2a. | x |\n");
//! let docs = [("vchan.md", doc)];
//! assert!(check_text("a.rs", "// docs/vchan.md §5.4 item 1, §5 row 2a", None, &docs).is_empty());
//! assert_eq!(check_text("a.rs", "// docs/vchan.md §5.5", None, &docs).len(), 1);
//! assert_eq!(check_text("a.rs", "// spec §5.4", None, &docs).len(), 1);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// This file, whose examples and tests hold bad references on purpose.
pub const SELF_PATH: &str = "tests/src/doc_refs.rs";

/// The documents a reference may name, as written before the `§`.
pub const DOC_NAMES: [&str; 2] = ["vchan.md", "qrexec.md"];

/// What one section of a document offers to references.
#[derive(Debug, Default, Clone)]
pub struct Section {
    /// First cells of the table rows in the section (trimmed).
    pub rows: Vec<String>,
    /// Numbers of the numbered list items in the section.
    pub items: BTreeSet<u32>,
}

/// The sections of one document, keyed by number (`"5"`, `"5.4"`).
#[derive(Debug, Default, Clone)]
pub struct DocIndex {
    /// Section number → what it holds. A top-level section also holds the
    /// rows and items of its subsections.
    pub sections: BTreeMap<String, Section>,
}

fn heading_number(line: &str) -> Option<(usize, String)> {
    let level = line.bytes().take_while(|&b| b == b'#').count();
    if !(2..=3).contains(&level) {
        return None;
    }
    let rest = line[level..].strip_prefix(' ')?;
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let num = num.trim_end_matches('.').to_string();
    if num.is_empty() || !num.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    Some((level, num))
}

fn list_item_number(line: &str) -> Option<u32> {
    let t = line.trim_start();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    let after = &t[digits.len()..];
    after.strip_prefix(". ").and_then(|_| digits.parse().ok())
}

fn first_cell(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix('|')?;
    let cell = rest.split('|').next()?.trim();
    if cell.is_empty() || cell.chars().all(|c| c == '-' || c == ':') {
        return None;
    }
    Some(cell.to_string())
}

impl DocIndex {
    /// Index a markdown document: `## N.` and `### N.M` headings, and the
    /// table rows and numbered items under them (code fences skipped).
    pub fn parse(text: &str) -> DocIndex {
        let mut idx = DocIndex::default();
        let mut top: Option<String> = None;
        let mut sub: Option<String> = None;
        let mut in_fence = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_fence = !in_fence;
                continue;
            }
            if in_fence {
                continue;
            }
            if line.starts_with('#') {
                match heading_number(line) {
                    Some((2, n)) => {
                        top = Some(n.clone());
                        sub = None;
                        idx.sections.entry(n).or_default();
                    }
                    Some((_, n)) => {
                        sub = Some(n.clone());
                        idx.sections.entry(n).or_default();
                    }
                    None => {
                        // An unnumbered heading ends the numbered section.
                        top = None;
                        sub = None;
                    }
                }
                continue;
            }
            let row = first_cell(line);
            let item = list_item_number(line);
            for key in [&top, &sub].into_iter().flatten() {
                let s = idx.sections.get_mut(key).expect("indexed above");
                if let Some(r) = &row {
                    s.rows.push(r.clone());
                }
                if let Some(i) = item {
                    s.items.insert(i);
                }
            }
        }
        idx
    }
}

fn row_matches(cell: &str, label: &str) -> bool {
    cell.strip_prefix(label)
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Split `s` at the first char that can't be part of a label.
fn take_label(s: &str) -> (&str, &str) {
    let end = s
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '′' || c == '″'))
        .map_or(s.len(), |(i, _)| i);
    s.split_at(end)
}

/// What a reference names inside its section: `("row", ["9c"])`,
/// `("item", ["1", "9"])`.
type Detail = (&'static str, Vec<String>);

/// One reference after the `§`: the section number and what follows.
fn parse_after_section(s: &str) -> Option<(String, Option<Detail>)> {
    let num: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let num_trim = num.trim_end_matches('.');
    if num_trim.is_empty() || !num_trim.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let rest = &s[num_trim.len()..];
    let kinds: [(&str, &'static str); 8] = [
        (" rows ", "row"),
        (" row ", "row"),
        (" items ", "item"),
        (" item ", "item"),
        (" steps ", "item"),
        (" step ", "item"),
        (" rules ", "item"),
        (" rule ", "item"),
    ];
    for (word, kind) in kinds {
        if let Some(after) = rest.strip_prefix(word) {
            let mut labels = Vec::new();
            let mut cur = after;
            loop {
                let (label, tail) = take_label(cur);
                if label.is_empty() {
                    break;
                }
                labels.push(label.to_string());
                // `3–5`, `9a/9b`: any label; `1–2, 8`: only a number after a comma.
                let next = ['–', '/']
                    .iter()
                    .find_map(|sep| tail.strip_prefix(*sep))
                    .filter(|n| n.starts_with(|c: char| c.is_ascii_alphanumeric()))
                    .or_else(|| {
                        tail.strip_prefix(", ")
                            .filter(|t| t.starts_with(|c: char| c.is_ascii_digit()))
                    });
                match next {
                    Some(n) => cur = n,
                    None => break,
                }
            }
            if labels.is_empty() {
                return Some((num_trim.to_string(), None));
            }
            return Some((num_trim.to_string(), Some((kind, labels))));
        }
    }
    Some((num_trim.to_string(), None))
}

/// Check every `§` reference in `text` (one file, `label` for messages).
/// `own_doc` is the document's own name when `text` is one of the docs.
/// Returns one message per bad reference.
pub fn check_text(
    label: &str,
    text: &str,
    own_doc: Option<&str>,
    docs: &[(&str, DocIndex)],
) -> Vec<String> {
    let mut errors = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let mut current: Option<&str> = own_doc;
        let mut i = 0;
        while i < line.len() {
            let rest = &line[i..];
            if let Some(name) = DOC_NAMES.iter().find(|n| rest.starts_with(**n)) {
                current = Some(name);
                i += name.len();
                continue;
            }
            if let Some(after) = rest.strip_prefix('§') {
                let at = format!("{label}:{}", lineno + 1);
                match (current, parse_after_section(after)) {
                    (None, _) => errors.push(format!(
                        "{at}: `§` without a document named before it on the line \
                         (write `docs/vchan.md §N` or `docs/qrexec.md §N`): {}",
                        line.trim()
                    )),
                    (Some(_), None) => errors.push(format!(
                        "{at}: `§` without a section number: {}",
                        line.trim()
                    )),
                    (Some(doc), Some((num, detail))) => {
                        let index = docs.iter().find(|(n, _)| *n == doc).map(|(_, d)| d);
                        match index.and_then(|d| d.sections.get(&num)) {
                            None => errors.push(format!("{at}: {doc} has no §{num}")),
                            Some(sec) => {
                                if let Some((kind, labels)) = detail {
                                    for l in labels {
                                        let ok = if kind == "row" {
                                            sec.rows.iter().any(|c| row_matches(c, &l))
                                        } else {
                                            l.parse().is_ok_and(|n: u32| sec.items.contains(&n))
                                        };
                                        if !ok {
                                            errors.push(format!(
                                                "{at}: {doc} §{num} has no {kind} {l}"
                                            ));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                i += '§'.len_utf8();
                continue;
            }
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    errors
}

/// Every file under `root` that may hold a reference: text files outside
/// `target`, hidden directories and fuzzing output.
pub fn candidate_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if name.starts_with('.')
                    || ["target", "corpus", "artifacts", "coverage"].contains(&name.as_str())
                {
                    continue;
                }
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The result of checking a whole tree.
#[derive(Debug, Default)]
pub struct TreeReport {
    /// Bad references, one message each.
    pub errors: Vec<String>,
    /// How many `§` references were looked at.
    pub references: usize,
    /// Files that hold at least one.
    pub files: usize,
}

/// Check every reference in the repository rooted at `root` against
/// `root/docs/vchan.md` and `root/docs/qrexec.md`.
pub fn check_tree(root: &Path) -> std::io::Result<TreeReport> {
    let mut docs = Vec::new();
    for name in DOC_NAMES {
        let text = std::fs::read_to_string(root.join("docs").join(name))?;
        docs.push((name, DocIndex::parse(&text)));
    }
    let mut report = TreeReport::default();
    for path in candidate_files(root) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // not UTF-8: no references
        };
        if !text.contains('§') {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(&path);
        if rel == Path::new(SELF_PATH) {
            continue; // its examples are made to fail
        }
        let own = DOC_NAMES
            .iter()
            .copied()
            .find(|n| rel == Path::new("docs").join(n));
        report.files += 1;
        report.references += text.matches('§').count();
        report
            .errors
            .extend(check_text(&rel.display().to_string(), &text, own, &docs));
    }
    Ok(report)
}

/// Relative links (`[text](path)`, no scheme, no pure `#anchor`) in the
/// markdown file `file` whose target does not exist, as messages.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("a.md"), "[b](b.md) [web](https://x.org) [c](c.md#part)").unwrap();
/// std::fs::write(dir.path().join("b.md"), "").unwrap();
/// let bad = tests::doc_refs::broken_links(&dir.path().join("a.md")).unwrap();
/// assert_eq!(bad.len(), 1);
/// assert!(bad[0].contains("c.md"));
/// ```
pub fn broken_links(file: &Path) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(file)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut bad = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            rest = &after[end..];
            let path = target.split('#').next().unwrap_or("");
            if path.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            if !dir.join(path).exists() {
                bad.push(format!(
                    "{}:{}: link to missing {target}",
                    file.display(),
                    lineno + 1
                ));
            }
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# Title
## 1. Overview
text
### 1.2 Detail
1. first
2. second
| row | what |
|---|---|
| 9c. | x |
| D. | y |
| 23 | z |
```
## 7. inside a fence is not a heading
3. nor an item
```
## 16. Measured
| 1a′. | a |
## Sources
4. not in a numbered section
";

    fn docs() -> Vec<(&'static str, DocIndex)> {
        vec![
            ("vchan.md", DocIndex::parse(DOC)),
            ("qrexec.md", DocIndex::parse("## 8. x\n### 8.4 y\n")),
        ]
    }

    fn errs(line: &str) -> Vec<String> {
        check_text("f.rs", line, None, &docs())
    }

    #[test]
    fn sections_rows_items_are_indexed() {
        let d = DocIndex::parse(DOC);
        let keys: Vec<_> = d.sections.keys().cloned().collect();
        assert_eq!(keys, ["1", "1.2", "16"]);
        assert_eq!(d.sections["1.2"].items, BTreeSet::from([1, 2]));
        assert!(d.sections["1"].rows.contains(&"9c.".to_string()));
        assert!(!d.sections["16"].items.contains(&4));
    }

    #[test]
    fn good_references_pass() {
        for ok in [
            "// docs/vchan.md §1",
            "// docs/vchan.md §1.2 step 2, §1 row 9c, §1 rows 9–D",
            "// (docs/vchan.md §1.2 item 1; docs/qrexec.md §8.4)",
            "// docs/vchan.md §1 row 9, §1 row 23, §16 row 1a′",
            "// docs/vchan.md §1–§16",
            "no references here",
        ] {
            assert_eq!(errs(ok), Vec::<String>::new(), "{ok}");
        }
    }

    #[test]
    fn bad_references_fail() {
        for (bad, why) in [
            ("// spec §1", "without a document"),
            ("// docs/vchan.md §2", "has no §2"),
            ("// docs/vchan.md §7", "has no §7"),
            ("// docs/vchan.md §1.3", "has no §1.3"),
            ("// docs/vchan.md §1.2 item 3", "has no item 3"),
            ("// docs/vchan.md §1 row 2", "has no row 2"),
            ("// docs/vchan.md §1 row 9d", "has no row 9d"),
            ("// docs/qrexec.md §8.4, §1.2", "has no §1.2"),
            ("// docs/vchan.md § 1", "without a section number"),
        ] {
            let e = errs(bad);
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].contains(why), "{bad}: {e:?}");
        }
    }

    #[test]
    fn a_document_refers_to_itself_until_another_is_named() {
        let d = docs();
        assert!(
            check_text(
                "docs/vchan.md",
                "see §1.2 and qrexec.md §8.4",
                Some("vchan.md"),
                &d
            )
            .is_empty()
        );
        assert_eq!(
            check_text(
                "docs/vchan.md",
                "qrexec.md §8.4 and §1.2",
                Some("vchan.md"),
                &d
            )
            .len(),
            1
        );
    }
}
