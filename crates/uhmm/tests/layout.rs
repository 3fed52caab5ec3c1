//! The core's layout, checked: the files of `crates/uhmm/src` import each
//! other in layers, with one cycle at most, through the address-space hub
//! (`mm.rs`); and no file is longer than [`MAX_LINES`] without saying why
//! at its top.
//!
//! An import is any path through `crate::` or `super::` outside comments
//! (a `use`, or a path written inline); a name re-exported at the crate's
//! root counts as an import of the file that defines it. `mod` lines are
//! not imports: a folder's `mod.rs` declares its files without depending on
//! them. `cargo test -p uhmm --test layout -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines a file of the core may have without a stated reason.
const MAX_LINES: usize = 700;

/// The file every cycle must pass through: the mm, which the driver
/// contract reaches back to (a driver's `migrate_to_ram` is handed the
/// address space whose pagemap table holds the driver).
const HUB: &str = "mm.rs";

/// The source files, as paths relative to `src`, with their text.
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).expect("under src").to_string_lossy().into_owned();
                out.insert(rel, std::fs::read_to_string(&path).expect("read source"));
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// `text` without comments, string and character literals.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A character literal (not a lifetime).
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The module path of a source file: `migrate/mod.rs` → `["migrate"]`.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file.trim_end_matches(".rs").split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The file that defines module `path`, or the deepest module on it that
/// has a file.
fn file_of(path: &[String], files: &BTreeMap<String, String>) -> Option<String> {
    (1..=path.len()).rev().find_map(|n| {
        let m = path[..n].join("/");
        [format!("{m}.rs"), format!("{m}/mod.rs")].into_iter().find(|f| files.contains_key(f))
    })
}

/// The paths written after each `crate::` / `super::` in `code`, expanded
/// through `{…}` groups: `crate::{a::X, b}` gives `a::X` and `b`.
fn paths(code: &str, prefix: &str) -> Vec<Vec<String>> {
    fn expand(s: &str, base: &[String], out: &mut Vec<Vec<String>>) {
        let s = s.trim();
        if let Some(inner) = s.strip_prefix('{') {
            let inner = inner.strip_suffix('}').unwrap_or(inner);
            let mut depth = 0;
            let mut start = 0;
            for (k, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&inner[start..k], base, out);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            expand(&inner[start..], base, out);
            return;
        }
        let mut path = base.to_vec();
        let mut rest = s;
        loop {
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if end > 0 && rest[..end] != *"self" {
                path.push(rest[..end].to_owned());
            }
            rest = &rest[end..];
            match rest.strip_prefix("::") {
                Some(r) if r.starts_with('{') => return expand(r, &path, out),
                Some(r) => rest = r,
                None => break,
            }
        }
        if !path.is_empty() {
            out.push(path);
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(k) = code[at..].find(prefix) {
        let start = at + k;
        let before = code[..start].chars().next_back();
        at = start + prefix.len();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        // The path runs to the end of its brace group, or to the first
        // character that cannot be in a path.
        let rest = &code[at..];
        let end = if rest.starts_with('{') {
            let mut depth = 0;
            rest.char_indices()
                .find(|&(_, c)| {
                    depth += i32::from(c == '{') - i32::from(c == '}');
                    depth == 0
                })
                .map_or(rest.len(), |(k, _)| k + 1)
        } else {
            rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '{')).unwrap_or(rest.len())
        };
        expand(rest[..end].trim_end_matches(':'), &[], &mut out);
    }
    out
}

/// The names the crate root re-exports, each with the module path it
/// comes from.
fn root_exports(lib: &str) -> BTreeMap<String, Vec<String>> {
    let code = code_only(lib);
    let mut out = BTreeMap::new();
    for stmt in code.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else { continue };
        for path in paths(&format!("crate::{rest}"), "crate::") {
            if let Some((name, module)) = path.split_last() {
                let name = name.split(" as ").last().unwrap_or(name).to_owned();
                out.insert(name, module.to_vec());
            }
        }
    }
    out
}

/// The import graph: file → the files it imports.
fn graph(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let exports = root_exports(&files["lib.rs"]);
    let mut out = BTreeMap::new();
    for (file, text) in files.iter().filter(|(f, _)| *f != "lib.rs") {
        let code = code_only(text);
        let here = module_of(file);
        let mut deps = BTreeSet::new();
        let mut add = |path: Vec<String>| {
            let path = match exports.get(&path[0]) {
                Some(module) if path.len() == 1 || !files.keys().any(|f| module_of(f) == path[..1]) => module.clone(),
                _ => path,
            };
            if let Some(target) = file_of(&path, files).filter(|t| t != file && t != "lib.rs") {
                deps.insert(target);
            }
        };
        for path in paths(&code, "crate::") {
            add(path);
        }
        // `super::` names the parent of the file's module.
        let parent = here[..here.len() - 1].to_vec();
        for path in paths(&code, "super::") {
            let mut full = parent.clone();
            full.extend(path);
            if full.is_empty() {
                continue;
            }
            add(full);
        }
        out.insert(file.clone(), deps);
    }
    out
}

/// Every simple cycle of `g`, each listed from its least file.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn dfs(
        g: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        out: &mut Vec<Vec<String>>,
    ) {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                out.push(path.clone());
            } else if next.as_str() > start && !path.contains(next) && out.len() < 1000 {
                path.push(next.clone());
                dfs(g, start, next, path, out);
                path.pop();
            }
        }
    }
    let mut out = Vec::new();
    for start in g.keys() {
        dfs(g, start, start, &mut vec![start.clone()], &mut out);
    }
    out
}

#[test]
fn the_core_imports_in_layers_with_one_cycle_at_most_through_the_hub() {
    let files = sources();
    assert!(files.contains_key(HUB), "the hub {HUB} is missing");
    let g = graph(&files);
    for (file, deps) in &g {
        println!("{file} -> {}", deps.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    let cycles = cycles(&g);
    for c in &cycles {
        println!("cycle: {}", c.join(" -> "));
    }
    assert!(cycles.len() <= 1, "{} import cycles (at most one): {cycles:?}", cycles.len());
    for c in &cycles {
        assert!(c.iter().any(|f| f == HUB), "a cycle that misses the hub {HUB}: {c:?}");
    }
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let files: BTreeMap<String, String> = [
        ("lib.rs", "mod a; mod b; pub use a::Thing;"),
        ("a.rs", "use crate::{b::X, c::{self, Y}};\n// use crate::d::Z;\nstruct Thing;"),
        ("b.rs", "fn f() { let s = \"crate::d::Q\"; crate::Thing::new(); }"),
        ("c/mod.rs", "use super::b::X;"),
        ("c/d.rs", "use super::c_helper;"),
        ("d.rs", ""),
    ]
    .into_iter()
    .map(|(f, t)| (f.to_owned(), t.to_owned()))
    .collect();
    let g = graph(&files);
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(g["a.rs"], set(&["b.rs", "c/mod.rs"]), "commented-out imports do not count");
    assert_eq!(g["b.rs"], set(&["a.rs"]), "a root re-export is its module; strings do not count");
    assert_eq!(g["c/mod.rs"], set(&["b.rs"]));
    assert_eq!(g["c/d.rs"], set(&["c/mod.rs"]));
    let cycle = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(cycles(&g), vec![cycle(&["a.rs", "b.rs"]), cycle(&["a.rs", "c/mod.rs", "b.rs"])]);
}

#[test]
fn no_file_of_the_core_is_longer_than_the_limit_without_a_reason() {
    let mut long = Vec::new();
    for (file, text) in sources() {
        let lines = text.lines().count();
        // The reason is a line of the module's opening comment.
        let reason = text.lines().take_while(|l| l.starts_with("//!")).any(|l| l.starts_with("//! Size:"));
        if lines > MAX_LINES && !reason {
            long.push(format!("{file}: {lines} lines"));
        }
    }
    assert!(long.is_empty(), "files over {MAX_LINES} lines without a `//! Size:` line saying why: {long:?}");
}
