//! The import graph inside `kecho` and `kecho-proto`, read from their sources: no circle in either, and for `kecho`
//! exactly the graph ARCHITECTURE.md draws. A change that adds an import the document does not show (or a circle)
//! fails here, so the document stays true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Names `lib.rs` re-exports at the crate root, by the module they come from (`pub use error::{Error, Result}`).
fn reexports(src: &Path) -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let mut out = BTreeMap::new();
    for stmt in statements(&lib, "pub use ") {
        let Some((module, rest)) = stmt.split_once("::") else { continue };
        for name in rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|n| !n.is_empty()) {
            out.insert(name.to_owned(), module.trim().to_owned());
        }
    }
    out
}

/// The text of each statement starting with `start` (up to its `;`), comments removed.
fn statements(text: &str, start: &str) -> Vec<String> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find(start) {
        let after = &rest[i + start.len()..];
        let end = after.find(';').unwrap_or(after.len());
        out.push(after[..end].to_owned());
        rest = &after[end..];
    }
    out
}

/// The top-level names a `crate::` path or `crate::{...}` group names.
fn crate_targets(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Names at depth one of the group.
            let (mut depth, mut token, mut expect_name) = (1, String::new(), true);
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                if depth == 1 && expect_name && (c.is_alphanumeric() || c == '_') {
                    token.push(c);
                    continue;
                }
                if !token.is_empty() {
                    out.push(std::mem::take(&mut token));
                    expect_name = false;
                }
                if depth == 1 && c == ',' {
                    expect_name = true;
                }
            }
            if !token.is_empty() {
                out.push(token);
            }
        } else {
            let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(name);
        }
        rest = after;
    }
    out
}

fn import_graph(name: &str) -> Graph {
    let src = crate_src(name);
    let reexported = reexports(&src);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        let entry = graph.entry(module.clone()).or_default();
        for target in crate_targets(&code) {
            let target = reexported.get(&target).cloned().unwrap_or(target);
            if target != module && !target.is_empty() {
                entry.insert(target);
            }
        }
    }
    graph
}

/// A circle in `graph`, as the path that closes it, if there is one.
fn find_circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(g: &Graph, n: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut circle = path[i..].to_vec();
            circle.push(n.to_owned());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

/// The graph ARCHITECTURE.md draws for `kecho` (the code block after "Who imports whom inside `kecho`").
fn documented_kecho_graph() -> Graph {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ARCHITECTURE.md"))
        .expect("read ARCHITECTURE.md");
    let start = doc.find("Who imports whom inside `kecho`").expect("the kecho import graph section");
    let block = &doc[start..];
    let open = block.find("```").expect("a code block") + 3;
    let body = &block[open..];
    let body = &body[body.find('\n').expect("a line") + 1..body.find("```").expect("the block's end")];
    let mut graph = Graph::new();
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let (from, to) = line.split_once("->").unwrap_or_else(|| panic!("a line without `->`: {line}"));
        let to = to.split('(').next().unwrap_or("");
        let targets: BTreeSet<String> = to.split(',').map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect();
        for from in from.split(',') {
            graph.insert(from.trim().to_owned(), targets.clone());
        }
    }
    graph
}

#[test]
fn kecho_has_no_import_circle_and_matches_the_architecture_document() {
    let actual = import_graph("kecho");
    assert!(actual.len() >= 8, "the reader found too few modules: {actual:?}");
    if let Some(circle) = find_circle(&actual) {
        panic!("import circle in kecho: {}", circle.join(" -> "));
    }
    let documented = documented_kecho_graph();
    for (module, targets) in &actual {
        let drawn = documented.get(module).cloned().unwrap_or_default();
        assert_eq!(targets, &drawn, "ARCHITECTURE.md draws {module} -> {drawn:?}; the code imports {targets:?}");
    }
    for module in documented.keys() {
        assert!(actual.contains_key(module), "ARCHITECTURE.md draws a module {module} that does not exist");
    }
}

#[test]
fn kecho_proto_has_no_import_circle() {
    let actual = import_graph("kecho-proto");
    assert!(actual.len() >= 6, "the reader found too few modules: {actual:?}");
    if let Some(circle) = find_circle(&actual) {
        panic!("import circle in kecho-proto: {}", circle.join(" -> "));
    }
}

#[test]
fn the_reader_sees_grouped_and_nested_imports_and_finds_circles() {
    let code = "use crate::{clock::now, link::{A, B}, queue};\nlet x = crate::error::Error::Closed;";
    assert_eq!(crate_targets(code), ["clock", "link", "queue", "error"]);
    let mut g = Graph::new();
    g.insert("a".into(), ["b".to_owned()].into());
    g.insert("b".into(), ["c".to_owned()].into());
    assert_eq!(find_circle(&g), None);
    g.insert("c".into(), ["a".to_owned()].into());
    assert_eq!(find_circle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}
