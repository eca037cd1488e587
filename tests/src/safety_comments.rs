//! Checks that the line directly above every `unsafe` block and
//! every `unsafe impl` is a `// SAFETY:` line: the claim that makes the
//! block sound, where a reviewer looks for it. Side remarks go above that
//! line, so the claim is always the last line of the comment.
//!
//! Clippy's `undocumented_unsafe_blocks` (denied in the workspace) accepts a
//! `SAFETY:` anywhere in the comment block above; this check is stricter.
//! Comments, doc comments, strings and char literals are not code: an
//! `unsafe` in them is not looked at, except in the fenced code of doc
//! comments (doc tests run, hidden `# ` lines too), where a line holding a
//! block needs a `// SAFETY:` doc-code line right above it. `unsafe fn`,
//! `unsafe trait`, `unsafe extern` and `#[unsafe(...)]` are not blocks and
//! carry their contract in their docs instead.
//!
//! ```
//! use tests::safety_comments::check_text;
//! // (`UNSAFE` written for the keyword, so that this text holds no block.)
//! let good = "// A side remark.\n// SAFETY: `p` is valid.\nUNSAFE { p.read() };\n";
//! let good = good.replace("UNSAFE", "unsafe");
//! assert!(check_text("a.rs", &good).errors.is_empty());
//! let bad = "// SAFETY: `p` is valid.\n// A side remark.\nUNSAFE { p.read() };\n";
//! assert_eq!(check_text("a.rs", &bad.replace("UNSAFE", "unsafe")).errors.len(), 1);
//! ```

use std::path::Path;

/// This file, whose examples and tests hold bad blocks on purpose.
pub const SELF_PATH: &str = "tests/src/safety_comments.rs";

/// What checking one file or a tree found.
#[derive(Debug, Default)]
pub struct Report {
    /// `path:line: ...` for every block or impl without the comment.
    pub errors: Vec<String>,
    /// How many `unsafe` blocks and impls were looked at.
    pub sites: usize,
    /// Files that hold at least one.
    pub files: usize,
}

/// Lex states of the tiny Rust scanner: only what tells code from
/// comments, strings and char literals.
#[derive(Clone, Copy)]
enum State {
    Code,
    LineComment,
    BlockComment(u32),
    Str,
    RawStr(usize),
}

/// `text` with comments, string contents and char literals replaced by
/// spaces (newlines kept, so line numbers stay).
fn code_only(text: &str) -> Vec<char> {
    let src: Vec<char> = text.chars().collect();
    let mut out = Vec::with_capacity(src.len());
    let mut st = State::Code;
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < src.len() {
        let c = src[i];
        let next = src.get(i + 1).copied();
        match st {
            State::Code => {
                if c == '/' && next == Some('/') {
                    st = State::LineComment;
                    out.push(' ');
                } else if c == '/' && next == Some('*') {
                    st = State::BlockComment(1);
                    out.extend([' ', ' ']);
                    i += 2;
                    continue;
                } else if c == '"' {
                    st = State::Str;
                    out.push(' ');
                } else if c == 'r'
                    && matches!(next, Some('"' | '#'))
                    && !src[..i]
                        .last()
                        .is_some_and(|p| (p.is_alphanumeric() || *p == '_') && *p != 'b')
                {
                    let hashes = src[i + 1..].iter().take_while(|&&h| h == '#').count();
                    if src.get(i + 1 + hashes) == Some(&'"') {
                        st = State::RawStr(hashes);
                        out.extend(std::iter::repeat_n(' ', hashes + 2));
                        i += hashes + 2;
                        continue;
                    }
                    out.push(c);
                } else if c == '\'' {
                    // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
                    let end = if next == Some('\\') {
                        src[i + 2..]
                            .iter()
                            .position(|&q| q == '\'')
                            .map(|p| i + 2 + p)
                    } else if src.get(i + 2) == Some(&'\'') {
                        Some(i + 2)
                    } else {
                        None
                    };
                    match end {
                        Some(e) => {
                            out.extend(src[i..=e].iter().map(|&q| blank(q)));
                            i = e + 1;
                            continue;
                        }
                        None => out.push(c),
                    }
                } else {
                    out.push(c);
                }
            }
            State::LineComment => {
                if c == '\n' {
                    st = State::Code;
                }
                out.push(blank(c));
            }
            State::BlockComment(depth) => {
                if c == '*' && next == Some('/') {
                    st = if depth == 1 {
                        State::Code
                    } else {
                        State::BlockComment(depth - 1)
                    };
                    out.extend([' ', ' ']);
                    i += 2;
                    continue;
                }
                if c == '/' && next == Some('*') {
                    st = State::BlockComment(depth + 1);
                    out.extend([' ', ' ']);
                    i += 2;
                    continue;
                }
                out.push(blank(c));
            }
            State::Str => {
                if c == '\\' {
                    out.push(' ');
                    if let Some(n) = next {
                        out.push(blank(n));
                    }
                    i += 2;
                    continue;
                }
                if c == '"' {
                    st = State::Code;
                }
                out.push(blank(c));
            }
            State::RawStr(hashes) => {
                if c == '"'
                    && src[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == '#')
                        .count()
                        == hashes
                {
                    st = State::Code;
                    out.extend(std::iter::repeat_n(' ', hashes + 1));
                    i += hashes + 1;
                    continue;
                }
                out.push(blank(c));
            }
        }
        i += 1;
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Line numbers (1-based) of the `unsafe` keywords in `text` that open a
/// block or an `unsafe impl`.
pub fn unsafe_sites(text: &str) -> Vec<usize> {
    let code = code_only(text);
    let word: Vec<char> = "unsafe".chars().collect();
    let mut sites = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < code.len() {
        if code[i] == '\n' {
            line += 1;
        }
        if code[i..].starts_with(&word)
            && !(i > 0 && is_ident(code[i - 1]))
            && !code.get(i + word.len()).is_some_and(|&c| is_ident(c))
        {
            let rest = &code[i + word.len()..];
            let start = rest.iter().position(|c| !c.is_whitespace());
            let after: String = start
                .map(|s| rest[s..].iter().take(5).collect())
                .unwrap_or_default();
            let is_impl = after.starts_with("impl") && !after.chars().nth(4).is_some_and(is_ident);
            if (after.starts_with('{') || is_impl) && sites.last() != Some(&line) {
                sites.push(line);
            }
            i += word.len();
            continue;
        }
        i += 1;
    }
    sites
}

/// Check one file's text; `name` prefixes the messages.
pub fn check_text(name: &str, text: &str) -> Report {
    let lines: Vec<&str> = text.lines().collect();
    let mut report = Report::default();
    for line in unsafe_sites(text) {
        report.sites += 1;
        let above = line
            .checked_sub(2)
            .and_then(|i| lines.get(i))
            .map(|l| l.trim_start());
        if !above.is_some_and(|l| l.starts_with("// SAFETY:")) {
            report.errors.push(format!(
                "{name}:{line}: the line above this `unsafe` is not a `// SAFETY:` line: {}",
                lines.get(line - 1).map_or("", |l| l.trim())
            ));
        }
    }
    for (line, above_ok) in doc_test_sites(&lines) {
        report.sites += 1;
        if !above_ok {
            report.errors.push(format!(
                "{name}:{line}: the doc-test line above this `unsafe` is not a `// SAFETY:` line: {}",
                lines[line - 1].trim()
            ));
        }
    }
    if report.sites > 0 {
        report.files = 1;
    }
    report
}

/// The code of a doc-comment line (`///` or `//!`, one space, a hidden
/// line's `# `), or None for other lines.
fn doc_code(l: &str) -> Option<&str> {
    let t = l.trim_start();
    let body = t.strip_prefix("///").or_else(|| t.strip_prefix("//!"))?;
    let body = body.strip_prefix(' ').unwrap_or(body);
    Some(body.strip_prefix("# ").unwrap_or(body).trim_start())
}

/// Blocks in the fenced code of doc comments: (1-based line, whether the
/// doc-code line above is a `// SAFETY:` line).
fn doc_test_sites(lines: &[&str]) -> Vec<(usize, bool)> {
    let mut sites = Vec::new();
    let mut fenced = false;
    let mut above: Option<&str> = None;
    for (i, l) in lines.iter().enumerate() {
        let Some(c) = doc_code(l) else {
            fenced = false;
            above = None;
            continue;
        };
        if c.starts_with("```") {
            fenced = !fenced;
        } else if fenced
            && c.split("unsafe")
                .skip(1)
                .any(|r| r.trim_start().starts_with('{'))
        {
            sites.push((i + 1, above.is_some_and(|a| a.starts_with("// SAFETY:"))));
        }
        above = Some(c);
    }
    sites
}

/// Check every `.rs` file below `root` (the repository), leaving out the
/// folders in `skip` (paths relative to `root`) and this file.
pub fn check_tree(root: &Path, skip: &[&str]) -> std::io::Result<Report> {
    let mut report = Report::default();
    for path in crate::doc_refs::candidate_files(root) {
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(&path);
        if rel == Path::new(SELF_PATH) || skip.iter().any(|s| rel.starts_with(s)) {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let one = check_text(&rel.display().to_string(), &text);
        report.errors.extend(one.errors);
        report.sites += one.sites;
        report.files += one.files;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples write `UNSAFE` for the keyword, so that this file's own
    /// text holds no block a line-based look would take for code.
    fn errors(text: &str) -> Vec<String> {
        check_text("t.rs", &text.replace("UNSAFE", "unsafe")).errors
    }

    fn sites(text: &str) -> usize {
        check_text("t.rs", &text.replace("UNSAFE", "unsafe")).sites
    }

    #[test]
    fn a_claim_right_above_passes() {
        let ok = "fn f(p: *const u8) -> u8 {\n    // Why volatile: the peer writes.\n    // SAFETY: `p` is valid.\n    UNSAFE { p.read_volatile() }\n}\n";
        assert_eq!(errors(ok), Vec::<String>::new());
        assert_eq!(sites(ok), 1);
        let assigned = "    // SAFETY: x.\n    let v = match UNSAFE {\n        g()\n    } {\n";
        assert!(errors(assigned).is_empty());
    }

    #[test]
    fn a_missing_or_buried_claim_fails() {
        let none = "fn f() {\n    UNSAFE { g() }\n}\n";
        let e = errors(none);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.rs:2:"), "{e:?}");
        let buried = "    // SAFETY: `p` is valid.\n    // A side remark after the claim.\n    UNSAFE { g() }\n";
        assert_eq!(errors(buried).len(), 1);
        let wrapped =
            "    // SAFETY: `p` is valid for the\n    // whole call.\n    UNSAFE { g() }\n";
        assert_eq!(errors(wrapped).len(), 1);
        let gap = "    // SAFETY: ok.\n\n    UNSAFE { g() }\n";
        assert_eq!(errors(gap).len(), 1);
        let first_line = "UNSAFE { g() }\n";
        assert_eq!(errors(first_line).len(), 1);
        let inline = "    f(|p| UNSAFE { *p });\n";
        assert_eq!(errors(inline).len(), 1);
        let spread = "    let v = f(\n        UNSAFE { g() },\n    );\n";
        assert_eq!(errors(spread).len(), 1);
        let attr = "// SAFETY: plain data.\n#[allow(x)]\nUNSAFE impl Send for T {}\n";
        assert_eq!(errors(attr).len(), 1);
    }

    #[test]
    fn impls_count_and_other_unsafe_items_do_not() {
        let imp =
            "UNSAFE impl Send for T {}\n// SAFETY: no interior state.\nUNSAFE impl Sync for T {}\n";
        let e = errors(imp);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.rs:1:"), "{e:?}");
        let items = "/// # Safety\n/// `p` valid.\nunsafe fn f(p: *const u8) {}\npub unsafe trait T {}\nunsafe extern \"C\" {}\n#[unsafe(no_mangle)]\npub unsafe extern \"C\" fn g() {}\nlet f: unsafe fn() = h;\n";
        assert!(errors(items).is_empty());
        assert_eq!(sites(items), 0);
        assert!(
            errors("struct Unsafe;\nlet unsafe_thing = 1;\nlet x = not_UNSAFE {};\n").is_empty()
        );
    }

    #[test]
    fn comments_strings_and_chars_are_not_code() {
        let text = concat!(
            "/// Prose, not a fence:\n/// UNSAFE { doc_prose() }\n/// (fenced doc code is checked).\n",
            "// UNSAFE { commented_out() }\n",
            "/* UNSAFE { a }\n /* nested */ UNSAFE { b } */\n",
            "let s = \"UNSAFE { in a string } \\\" UNSAFE { still }\";\n",
            "let r = r#\"UNSAFE { raw \"quoted\" }\"#;\n",
            "let c = '\"'; let q = '\\''; let l: &'a str = x;\n",
            "fn lt<'a>(x: &'a u8) {}\n",
        );
        assert_eq!(sites(text), 0, "{:?}", errors(text));
        // After all that, code is code again.
        let tail = format!("{text}UNSAFE {{ real() }}\n");
        let e = errors(&tail);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.rs:11:"), "{e:?}");
    }

    #[test]
    fn blocks_in_doc_tests_need_their_claim_too() {
        let good = "/// ```\n/// # // SAFETY: single-threaded.\n/// # UNSAFE { g() }\n/// ```\nfn f() {}\n";
        assert!(errors(good).is_empty(), "{:?}", errors(good));
        assert_eq!(sites(good), 1);
        let bad = "//! ```\n//! let x = 1;\n//! UNSAFE { g() }\n//! ```\n";
        let e = errors(bad);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.rs:3:"), "{e:?}");
        // Prose outside a fence is not code.
        assert_eq!(sites("/// Every `UNSAFE { .. }` block.\nfn f() {}\n"), 0);
    }

    #[test]
    fn a_tree_walk_finds_a_bad_file_and_skips_what_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/src")).unwrap();
        std::fs::create_dir_all(root.join("b/src")).unwrap();
        std::fs::create_dir_all(root.join("target")).unwrap();
        std::fs::write(
            root.join("a/src/lib.rs"),
            "// SAFETY: ok.\nUNSAFE { f() }\n".replace("UNSAFE", "unsafe"),
        )
        .unwrap();
        std::fs::write(
            root.join("b/src/lib.rs"),
            "UNSAFE { f() }\n".replace("UNSAFE", "unsafe"),
        )
        .unwrap();
        std::fs::write(
            root.join("target/x.rs"),
            "UNSAFE { f() }\n".replace("UNSAFE", "unsafe"),
        )
        .unwrap();
        std::fs::write(
            root.join("b/notes.txt"),
            "UNSAFE { f() }\n".replace("UNSAFE", "unsafe"),
        )
        .unwrap();
        let all = check_tree(root, &[]).unwrap();
        assert_eq!((all.sites, all.files), (2, 2));
        assert_eq!(all.errors.len(), 1);
        assert!(
            all.errors[0].starts_with("b/src/lib.rs:1:"),
            "{:?}",
            all.errors
        );
        let skipped = check_tree(root, &["b/src"]).unwrap();
        assert!(skipped.errors.is_empty());
        assert_eq!(skipped.sites, 1);
    }
}
