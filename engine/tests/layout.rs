//! The engine's source layout, read as text: no import cycle between its modules, the protocol
//! modules independent of the control plane, and no source file of the workspace (tests aside)
//! over 700 lines.
//!
//! An import is any path a file names through `crate::`, `super::`, `self::` or one of its own
//! child modules, in `use` declarations and in code. Two graphs are checked: the top-level
//! modules (`app`, `export`, `nbd`, ...), and the files, where a module's file and the files of
//! its own submodules may name each other (a module re-exporting what its submodules define,
//! and a submodule continuing its parent's `impl`, are one unit) but any other cycle counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest source file allowed outside tests.
const MAX_LINES: usize = 700;

/// A module path from the crate root (`["nvmf", "conn", "io"]`).
type ModPath = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a file of `src` defines.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    match last.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        name => parts.push(name.trim_end_matches(".rs").to_string()),
    }
    parts
}

/// The text without comments (doc links are not imports) and string literals.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A character literal such as '{' must not open a use group.
            out.push_str("' '");
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a `use` tree (`crate::a::{b, c::{d, e}}`) into its paths.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn parse(s: &[char], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        loop {
            while *i < s.len() && s[*i].is_whitespace() {
                *i += 1;
            }
            if *i >= s.len() {
                out.push(path);
                return;
            }
            if s[*i] == '{' {
                *i += 1;
                loop {
                    parse(s, i, &path, out);
                    while *i < s.len() && s[*i].is_whitespace() {
                        *i += 1;
                    }
                    if *i < s.len() && s[*i] == ',' {
                        *i += 1;
                        continue;
                    }
                    if *i < s.len() && s[*i] == '}' {
                        *i += 1;
                    }
                    return;
                }
            }
            let start = *i;
            while *i < s.len() && (is_ident(s[*i]) || s[*i] == '*') {
                *i += 1;
            }
            let seg: String = s[start..*i].iter().collect();
            if !seg.is_empty() && seg != "self" && seg != "*" {
                path.push(seg);
            }
            while *i < s.len() && s[*i].is_whitespace() {
                *i += 1;
            }
            if s[*i..].starts_with(&[':', ':']) {
                *i += 2;
                continue;
            }
            // `as alias`: skip to the end of this item.
            while *i < s.len() && s[*i] != ',' && s[*i] != '}' {
                *i += 1;
            }
            out.push(path);
            return;
        }
    }
    let chars: Vec<char> = tree.chars().collect();
    let mut out = Vec::new();
    parse(&chars, &mut 0, &[], &mut out);
    out
}

/// Every path the code names that may lead into the crate: `use` trees and inline paths.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let at_word = i == 0 || !is_ident(chars[i - 1]);
        if at_word && chars[i..].starts_with(&['u', 's', 'e', ' ']) {
            let end = chars[i..]
                .iter()
                .position(|&c| c == ';')
                .map_or(chars.len(), |p| i + p);
            let tree: String = chars[i + 4..end].iter().collect();
            paths.extend(expand_use(&tree));
            i = end;
            continue;
        }
        if at_word {
            for root in ["crate::", "super::", "self::"] {
                let r: Vec<char> = root.chars().collect();
                if chars[i..].starts_with(&r) {
                    let mut j = i;
                    let mut segs = Vec::new();
                    loop {
                        let s = j;
                        while j < chars.len() && is_ident(chars[j]) {
                            j += 1;
                        }
                        segs.push(chars[s..j].iter().collect::<String>());
                        if chars[j..].starts_with(&[':', ':']) && chars.get(j + 2) != Some(&'{') {
                            j += 2;
                        } else {
                            break;
                        }
                    }
                    paths.push(segs);
                    i = j;
                    break;
                }
            }
        }
        i += 1;
    }
    paths
}

/// The module a path names, absolute from the crate root (`None` for another crate's).
fn absolute(from: &ModPath, path: &[String], modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    let first = path.first()?;
    // `super` and `self` are relative to the file's module (`a/b.rs` and `a/b/mod.rs` are both
    // module a::b).
    let mut base = from.clone();
    let rest: &[String] = match first.as_str() {
        "crate" => {
            base.clear();
            &path[1..]
        }
        "self" => &path[1..],
        "super" => {
            let mut k = 0;
            while path.get(k).is_some_and(|s| s == "super") {
                base.pop();
                k += 1;
            }
            &path[k..]
        }
        child => {
            let mut m = from.clone();
            m.push(child.to_string());
            if !modules.contains(&m) {
                return None;
            }
            path
        }
    };
    let mut m = base;
    m.extend(rest.iter().cloned());
    // The longest prefix that is a module with a file.
    while !m.is_empty() && !modules.contains(&m) {
        m.pop();
    }
    Some(m)
}

/// A cycle in `graph`, if there is one.
fn find_cycle<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        n: &N,
        graph: &BTreeMap<N, BTreeSet<N>>,
        state: &mut BTreeMap<N, u8>,
        stack: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// The engine's files by module, and what each names.
fn engine_imports() -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // main.rs and the binary's own modules are a second crate on the same files.
    files.retain(|f| f.file_name().is_some_and(|n| n != "main.rs"));
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph = BTreeMap::new();
    for f in &files {
        let from = module_of(&src, f);
        let text = std::fs::read_to_string(f).expect("readable source");
        let mut to = BTreeSet::new();
        for p in named_paths(&code_only(&text)) {
            if let Some(m) = absolute(&from, &p, &modules) {
                if m != from && !m.is_empty() {
                    to.insert(m);
                }
            }
        }
        graph.insert(from, to);
    }
    graph
}

#[test]
fn the_engine_modules_import_each_other_without_a_cycle() {
    let graph = engine_imports();
    assert!(graph.len() > 20, "the engine's files were not found");
    // Top-level modules.
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &graph {
        let Some(a) = from.first() else { continue };
        let entry = top.entry(a.clone()).or_default();
        for to in tos {
            if to[0] != *a {
                entry.insert(to[0].clone());
            }
        }
    }
    if let Some(c) = find_cycle(&top) {
        panic!("import cycle between top-level modules: {}", c.join(" -> "));
    }
    // Files, a module's own submodules aside.
    let related = |a: &ModPath, b: &ModPath| a.starts_with(b) || b.starts_with(a);
    let files: BTreeMap<ModPath, BTreeSet<ModPath>> = graph
        .iter()
        .map(|(from, tos)| {
            let kept = tos.iter().filter(|t| !related(from, t)).cloned().collect();
            (from.clone(), kept)
        })
        .collect();
    if let Some(c) = find_cycle(&files) {
        let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
        panic!("import cycle between files: {}", names.join(" -> "));
    }
}

#[test]
fn the_protocols_do_not_reach_into_the_control_plane() {
    let graph = engine_imports();
    for (from, tos) in &graph {
        if matches!(
            from.first().map(String::as_str),
            Some("nbd" | "nvmf" | "export")
        ) {
            for to in tos {
                assert_ne!(
                    to.first().map(String::as_str),
                    Some("app"),
                    "{} names the control plane ({})",
                    from.join("::"),
                    to.join("::")
                );
            }
        }
    }
}

#[test]
fn no_source_file_is_over_700_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in ["hugepages", "drivers", "engine", "bench", "tests"] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 50, "the workspace's sources were not found");
    let mut long = Vec::new();
    for f in files {
        // Unit test modules are tests.
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let lines = std::fs::read_to_string(&f)
            .expect("readable")
            .lines()
            .count();
        if lines > MAX_LINES {
            long.push(format!("{} ({lines} lines)", f.display()));
        }
    }
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_layout_reader_sees_imports_and_cycles() {
    // The reader itself: a use tree, an inline path, and a cycle.
    let code = code_only(
        "use crate::a::{b::{C, D}, e};\n// use crate::z;\nfn f() { super::g::h(); let s = \"crate::q\"; }",
    );
    let paths = named_paths(&code);
    assert!(paths.contains(&vec!["crate".into(), "a".into(), "b".into(), "C".into()]));
    assert!(paths.contains(&vec!["crate".into(), "a".into(), "e".into()]));
    assert!(paths.contains(&vec!["super".into(), "g".into(), "h".into()]));
    assert!(!paths
        .iter()
        .any(|p| p.contains(&"z".to_string()) || p.contains(&"q".to_string())));
    let mut g: BTreeMap<u8, BTreeSet<u8>> = BTreeMap::new();
    g.insert(1, [2].into());
    g.insert(2, [3].into());
    g.insert(3, [1].into());
    assert_eq!(find_cycle(&g), Some(vec![1, 2, 3, 1]));
    g.insert(3, BTreeSet::new());
    assert_eq!(find_cycle(&g), None);
}
