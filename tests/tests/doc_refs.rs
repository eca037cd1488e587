//! Every section reference (`docs/vchan.md` plus a section sign and a number)
//! in the repository (code comments, READMEs, the docs
//! themselves) points at a section, row or item that exists in
//! `docs/vchan.md` or `docs/qrexec.md` (convention: `docs/README.md`).

use std::path::Path;

#[test]
fn every_section_reference_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let report = tests::doc_refs::check_tree(&root).expect("docs/vchan.md and docs/qrexec.md");
    assert!(
        report.errors.is_empty(),
        "{} dangling or ambiguous section references:\n{}",
        report.errors.len(),
        report.errors.join("\n")
    );
    // The walk must have found the code's references, not an empty tree.
    assert!(
        report.references > 150 && report.files > 30,
        "only {} references in {} files: is the walk broken?",
        report.references,
        report.files
    );
}

/// The repository's own markdown (READMEs, docs/, CHANGELOG) links only to
/// files that exist.
#[test]
fn relative_markdown_links_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    let mut bad = Vec::new();
    for f in tests::doc_refs::candidate_files(&root) {
        if f.extension().is_some_and(|e| e == "md") {
            checked += 1;
            bad.extend(tests::doc_refs::broken_links(&f).unwrap());
        }
    }
    assert!(bad.is_empty(), "broken links:\n{}", bad.join("\n"));
    assert!(checked >= 10, "only {checked} markdown files found");
}
