//! The dependency order of the modules, as ARCHITECTURE.md writes it, is the order the code
//! keeps: a module imports only modules below it, and no two files of one folder import each
//! other, directly or around a loop. Reads `src/`, so an upward import fails here with the file
//! and the line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The order from ARCHITECTURE.md: the paragraph that starts with "Order:", modules in
/// backticks, bottom first.
fn order() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let at = doc
        .find("\nOrder:")
        .expect("ARCHITECTURE.md states the order in a paragraph starting with `Order:`");
    let paragraph = doc[at + 1..].split("\n\n").next().unwrap_or_default();
    paragraph
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's module path under `src/`: `bus/publisher.rs` -> ["bus", "publisher"]; a `mod.rs`
/// is its folder's module.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root().join("src")).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Code only: comments and string literals can name modules freely.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let code = line.split("//").next().unwrap_or("");
            (i + 1, code.to_owned())
        })
        .filter(|(_, code)| !code.trim().is_empty())
        .collect()
}

/// The paths a line names (`crate::a::b`, `super::c`), as module paths from `src/`.
fn named_modules(module: &[String], line: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    let bytes = line.as_bytes();
    let ident = |s: &str| {
        s.split("::")
            .map(|p| {
                p.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect::<Vec<_>>()
    };
    for (start, _) in line.match_indices("crate::") {
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        out.push(ident(&line[start + "crate::".len()..]));
    }
    for (start, _) in line.match_indices("super::") {
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        // A folder's mod.rs is the folder's module, so its `super` is the folder's parent,
        // as a file's `super` is its folder: one step up either way.
        let mut base: Vec<String> = module.to_vec();
        base.pop();
        let mut rest = &line[start..];
        while let Some(after) = rest.strip_prefix("super::") {
            rest = after;
            if rest.starts_with("super::") {
                base.pop();
            }
        }
        let mut path = base;
        path.extend(ident(rest));
        out.push(path);
    }
    out
}

struct Import {
    from: PathBuf,
    line: usize,
    to: Vec<String>,
}

fn imports() -> Vec<Import> {
    let mut files = vec![];
    rust_files(&root().join("src"), &mut files);
    let mut all = vec![];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let module = module_of(&file);
        for (line, code) in code_lines(&text) {
            for to in named_modules(&module, &code) {
                all.push(Import {
                    from: file.clone(),
                    line,
                    to,
                });
            }
        }
    }
    all
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let order = order();
    assert!(order.len() >= 10, "the order lists the modules: {order:?}");
    let rank = |m: &str| order.iter().position(|o| o == m);
    let mut upward = vec![];
    for import in imports() {
        let module = module_of(&import.from);
        let (Some(from), Some(to)) = (module.first(), import.to.first()) else {
            continue;
        };
        // main.rs and lib.rs sit above everything; `run` is the worker's.
        if from == "main" || from == "lib" || from == to {
            continue;
        }
        let to = if to == "run" { "worker" } else { to.as_str() };
        let (Some(a), Some(b)) = (rank(from), rank(to)) else {
            panic!(
                "{}:{}: {from} or {to} is not in ARCHITECTURE.md's order",
                import.from.display(),
                import.line
            );
        };
        if b > a {
            upward.push(format!(
                "{}:{} ({from} imports {to}, which is above it)",
                import.from.display(),
                import.line
            ));
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

/// Within one folder, the files (not the folder's own mod.rs, which declares them) import
/// each other along one order too: no loop.
#[test]
fn no_two_files_of_a_folder_import_each_other() {
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut files = vec![];
    rust_files(&root().join("src"), &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(f)).collect();
    for import in imports() {
        let from = module_of(&import.from);
        if from.len() < 2 || import.from.file_name().is_some_and(|n| n == "mod.rs") {
            continue;
        }
        // The longest prefix of the path that is a file of ours, in the same folder.
        let target = (1..=import.to.len())
            .rev()
            .map(|n| import.to[..n].to_vec())
            .find(|m| modules.contains(m));
        if let Some(to) = target
            && to.len() == from.len()
            && to[..to.len() - 1] == from[..from.len() - 1]
            && to != from
        {
            edges.entry(from).or_default().insert(to);
        }
    }
    // Depth-first search for a loop.
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        path: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            return Some(path[at..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, &edges, &mut vec![], &mut done) {
            let names: Vec<String> = cycle.iter().map(|m| m.join("/")).collect();
            panic!("files that import each other: {}", names.join(" -> "));
        }
    }
}
