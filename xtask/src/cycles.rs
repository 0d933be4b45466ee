//! `cargo xtask cycles`: module import cycles in `gateway/src`.
//!
//! The crate is laid out in layers whose imports point down only (`gateway/src/lib.rs`). A
//! cycle between two sibling modules means the layering broke: neither can be understood,
//! tested or moved without the other. This check keeps it from coming back.
//!
//! How: every `.rs` file under `gateway/src` is mapped to its module path (`io/uring.rs` is
//! `io::uring`, `config/mod.rs` is `config`, `main.rs` is a top-level `main` beside the
//! library's modules). In each file's code (comments, doc comments, string literals and
//! `#[cfg(test)] mod` blocks removed) every path rooted at `crate::`, `super::` (and
//! `gateway::` in `main.rs`, which sees the library from outside) is collected, `use` groups
//! included, and resolved to the deepest module that exists. An edge from module `a::x` to
//! `b::y` is an edge between the siblings `a` and `b` under their common parent; each
//! parent's siblings form one graph. Every strongly connected component of two or more
//! siblings is reported with all its edges, each located by the first file and line that
//! makes it. A token scanner rather than a Rust parser: no heavy dependency, and paths are
//! all it needs to see.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The crate's `src` directory to check (default: this workspace's `gateway/src`).
    #[arg(long)]
    pub src: Option<std::path::PathBuf>,
}

/// Checks `gateway/src` and fails listing every cycle.
pub fn run(args: &Args) -> Result<()> {
    let src = args
        .src
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("gateway/src"));
    let cycles = check_dir(&src)?;
    if cycles.is_empty() {
        eprintln!("xtask: no module import cycles in gateway/src");
        return Ok(());
    }
    bail!("{}", report(&cycles))
}

/// Reads every `.rs` file under `dir` and returns its cycles.
pub fn check_dir(dir: &Path) -> Result<Vec<Cycle>> {
    let mut files = Vec::new();
    read_tree(dir, dir, &mut files)?;
    Ok(find_cycles(&files))
}

/// The cycles, one block each, for an error message.
pub fn report(cycles: &[Cycle]) -> String {
    let mut text = format!("{} module import cycle(s) in gateway/src:", cycles.len());
    for cycle in cycles {
        text.push_str(&format!("\n{cycle}"));
    }
    text
}

fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            read_tree(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let rel = path.strip_prefix(root).expect("under root");
            out.push((rel.to_string_lossy().replace('\\', "/"), text));
        }
    }
    Ok(())
}

/// Where an edge is made: the first use found, and the number of uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    pub file: String,
    pub line: usize,
    pub path: String,
    /// How many places make this edge: the fewest is usually the one to cut.
    pub uses: usize,
}

/// Siblings under `parent` that import each other, with one witness per edge among them.
#[derive(Debug, PartialEq, Eq)]
pub struct Cycle {
    pub parent: String,
    pub members: Vec<String>,
    pub edges: Vec<(String, String, Witness)>,
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let under = if self.parent.is_empty() {
            "the crate root".to_string()
        } else {
            format!("`{}`", self.parent)
        };
        write!(f, "  cycle under {under}: {}", self.members.join(" <-> "))?;
        write!(
            f,
            "\n    edges, fewest uses first (an edge pointing up is usually rare):"
        )?;
        for (from, to, w) in &self.edges {
            write!(
                f,
                "\n    {from} -> {to}: gateway/src/{}:{} ({}), {} use(s)",
                w.file, w.line, w.path, w.uses
            )?;
        }
        Ok(())
    }
}

/// The module path of a file relative to the crate's `src`; `main.rs` is `main`.
fn module_of(file: &str) -> Vec<String> {
    let stem = file.strip_suffix(".rs").unwrap_or(file);
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if matches!(parts.last().map(String::as_str), Some("mod")) || parts == ["lib"] {
        parts.pop();
    }
    parts
}

/// Every cycle among sibling modules of the crate made of `files` (path relative to `src`,
/// text).
pub fn find_cycles(files: &[(String, String)]) -> Vec<Cycle> {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(f, _)| module_of(f)).collect();
    let scanned: Vec<(&String, Vec<String>, Vec<PathUse>)> = files
        .iter()
        .map(|(file, text)| {
            let (uses, tests) = paths_in(text, file == "main.rs");
            (file, tests, uses)
        })
        .collect();
    // `#[cfg(test)] mod x;`: x's file (and anything under it) is test code.
    let test_only: Vec<Vec<String>> = scanned
        .iter()
        .flat_map(|(file, tests, _)| {
            let here = module_of(file);
            tests.iter().map(move |t| {
                let mut m = here.clone();
                m.push(t.clone());
                m
            })
        })
        .collect();
    // parent -> (from, to) -> first witness
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<(String, String), Witness>> = BTreeMap::new();
    for (file, _, uses) in &scanned {
        let here = module_of(file);
        if test_only.iter().any(|t| here.starts_with(t)) {
            continue;
        }
        for use_ in uses {
            let full = match use_.root {
                Root::Crate => use_.segments.clone(),
                Root::Super(n) => {
                    if n > here.len() {
                        continue;
                    }
                    let mut p = here[..here.len() - n].to_vec();
                    p.extend(use_.segments.iter().cloned());
                    p
                }
            };
            let depth = (0..=full.len())
                .rev()
                .find(|&k| modules.contains(&full[..k]))
                .unwrap_or(0);
            let target = &full[..depth];
            let common = here.iter().zip(target).take_while(|(a, b)| a == b).count();
            // Only siblings: a module using its ancestor or its descendant is layering.
            if common >= here.len() || common >= target.len() {
                continue;
            }
            let witness = Witness {
                file: (*file).clone(),
                line: use_.line,
                path: use_.text.clone(),
                uses: 0,
            };
            let (from, to) = (here[common].clone(), target[common].clone());
            let edge = if use_.reverse { (to, from) } else { (from, to) };
            graphs
                .entry(here[..common].to_vec())
                .or_default()
                .entry(edge)
                .or_insert(witness)
                .uses += 1;
        }
    }
    let mut cycles = Vec::new();
    for (parent, edges) in graphs {
        for members in strongly_connected(&edges) {
            // Fewest uses first: in a layered tree, the edge that points up is the rare one.
            let mut edges: Vec<(String, String, Witness)> = edges
                .iter()
                .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                .map(|((a, b), w)| (a.clone(), b.clone(), w.clone()))
                .collect();
            edges.sort_by_key(|(_, _, w)| w.uses);
            cycles.push(Cycle {
                parent: parent.join("::"),
                members: members.into_iter().collect(),
                edges,
            });
        }
    }
    cycles
}

/// Components of two or more nodes (Tarjan's algorithm; graphs here are a few dozen nodes).
fn strongly_connected(edges: &BTreeMap<(String, String), Witness>) -> Vec<BTreeSet<String>> {
    let nodes: BTreeSet<&String> = edges.keys().flat_map(|(a, b)| [a, b]).collect();
    let next = |n: &String| -> Vec<&String> {
        edges
            .keys()
            .filter(|(a, _)| a == n)
            .map(|(_, b)| b)
            .collect()
    };
    struct State<'a> {
        index: BTreeMap<&'a String, usize>,
        low: BTreeMap<&'a String, usize>,
        stack: Vec<&'a String>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(n: &'a String, next: &dyn Fn(&String) -> Vec<&'a String>, s: &mut State<'a>) {
        let i = s.index.len();
        s.index.insert(n, i);
        s.low.insert(n, i);
        s.stack.push(n);
        for m in next(n) {
            if !s.index.contains_key(m) {
                visit(m, next, s);
                let low = s.low[n].min(s.low[m]);
                s.low.insert(n, low);
            } else if s.stack.contains(&m) {
                let low = s.low[n].min(s.index[m]);
                s.low.insert(n, low);
            }
        }
        if s.low[n] == s.index[n] {
            let mut component = BTreeSet::new();
            while let Some(m) = s.stack.pop() {
                component.insert(m.clone());
                if m == n {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for n in nodes {
        if !state.index.contains_key(n) {
            visit(n, &next, &mut state);
        }
    }
    state.out
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    Crate,
    /// `super::` repeated this many times.
    Super(usize),
}

/// One path used in code.
#[derive(Debug)]
struct PathUse {
    root: Root,
    segments: Vec<String>,
    line: usize,
    text: String,
    /// An inherent `impl` of the path's type: the type's own module then depends on this
    /// one (its methods live here), so the edge points the other way.
    reverse: bool,
    /// Written in a `use` item, so its last segment is a name in scope in the file.
    imported: bool,
}

#[derive(Debug, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

/// The paths a file's code uses, rooted at `crate::` or `super::` (or `gateway::` for the
/// binary, which sees the library as an external crate; its own `crate::` is not the
/// library), and the names of the test-only modules it declares in files of their own.
fn paths_in(text: &str, is_main: bool) -> (Vec<PathUse>, Vec<String>) {
    let (code, test_modules) = strip_test_modules(&code_only(text));
    let tokens = tokens(&code);
    let is = |i: usize, s: &str| tokens.get(i).is_some_and(|t| t.text == s);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let word = tokens[i].text.as_str();
        let library_root = if is_main {
            word == "gateway"
        } else {
            word == "crate" || word == "$crate"
        };
        let starts =
            (library_root || word == "super") && is(i + 1, "::") && !is(i.wrapping_sub(1), "::");
        if !starts {
            i += 1;
            continue;
        }
        let line = tokens[i].line;
        let imported = is(i.wrapping_sub(1), "use");
        let mut root = if library_root {
            Root::Crate
        } else {
            Root::Super(0)
        };
        let mut j = i;
        while let Root::Super(n) = root {
            if is(j, "super") && is(j + 1, "::") {
                root = Root::Super(n + 1);
                j += 2;
            } else {
                break;
            }
        }
        if root == Root::Crate {
            j += 2;
        }
        let mut leaves = Vec::new();
        let end = use_tree(&tokens, j, Vec::new(), &mut leaves);
        for segments in leaves {
            let prefix = match root {
                Root::Crate => tokens[i].text.clone(),
                Root::Super(n) => vec!["super"; n].join("::"),
            };
            let text = std::iter::once(prefix)
                .chain(segments.iter().cloned())
                .collect::<Vec<_>>()
                .join("::");
            out.push(PathUse {
                root,
                segments,
                line,
                text,
                reverse: false,
                imported,
            });
        }
        i = end.max(i + 1);
    }
    let impls = foreign_impls(&tokens, &out);
    out.extend(impls);
    (out, test_modules)
}

/// Inherent `impl`s (`impl T {`, not `impl Trait for T`) of types named by a crate path
/// or imported by one of `uses`: methods of a type written in another module are a
/// dependency of the type's module on this one, invisible in its own imports.
fn foreign_impls(tokens: &[Token], uses: &[PathUse]) -> Vec<PathUse> {
    let text = |i: usize| tokens.get(i).map(|t| t.text.as_str()).unwrap_or("");
    let skip_generics = |mut i: usize| {
        if text(i) != "<" {
            return i;
        }
        let mut depth = 0;
        while i < tokens.len() {
            match text(i) {
                "<" => depth += 1,
                ">" => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    // A type defined in this file shadows nothing imported: its impls are local.
    let local: BTreeSet<&str> = tokens
        .windows(2)
        .filter(|w| matches!(w[0].text.as_str(), "struct" | "enum" | "union" | "type"))
        .map(|w| w[1].text.as_str())
        .collect();
    let mut out = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if token.text != "impl" || text(i.wrapping_sub(1)) == "::" {
            continue;
        }
        let mut j = skip_generics(i + 1);
        let mut path = Vec::new();
        while is_ident(text(j)) || text(j) == "$crate" {
            path.push(text(j).to_string());
            j += 1;
            if text(j) != "::" {
                break;
            }
            j += 1;
        }
        j = skip_generics(j);
        if path.is_empty() || !matches!(text(j), "{" | "where") {
            continue;
        }
        let found = match path[0].as_str() {
            "crate" | "$crate" => Some((Root::Crate, path[1..].to_vec())),
            "super" => {
                let n = path.iter().take_while(|p| *p == "super").count();
                Some((Root::Super(n), path[n..].to_vec()))
            }
            name if path.len() == 1 && !local.contains(name) => uses
                .iter()
                .find(|u| u.imported && u.segments.last().map(String::as_str) == Some(name))
                .map(|u| (u.root, u.segments.clone())),
            _ => None,
        };
        if let Some((root, segments)) = found {
            out.push(PathUse {
                root,
                segments,
                line: token.line,
                text: format!("impl {}", path.join("::")),
                reverse: true,
                imported: false,
            });
        }
    }
    out
}

fn is_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Parses a path or `use` tree at `i` (`a::b`, `a::{b, c::*}`, `a as b`), pushing each
/// leaf path; returns the index after it.
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let text = |i: usize| tokens.get(i).map(|t| t.text.as_str()).unwrap_or("");
    match text(i) {
        "{" => {
            i += 1;
            while i < tokens.len() && text(i) != "}" {
                let before = i;
                i = use_tree(tokens, i, prefix.clone(), out);
                if text(i) == "," {
                    i += 1;
                } else if text(i) != "}" || i == before {
                    // Not a use tree after all: give up on this group.
                    return i.max(before + 1);
                }
            }
            i + 1
        }
        word if is_ident(word) => {
            let mut path = prefix;
            path.push(word.to_string());
            i += 1;
            if text(i) == "::" && (is_ident(text(i + 1)) || matches!(text(i + 1), "{" | "*")) {
                return use_tree(tokens, i + 1, path, out);
            }
            if text(i) == "as" {
                i += 2;
            }
            out.push(path);
            i
        }
        "*" => {
            out.push(prefix);
            i + 1
        }
        _ => {
            out.push(prefix);
            i
        }
    }
}

/// Identifiers (with a leading `$` for `$crate`), `::`, and single punctuation characters,
/// each with its line.
fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token {
                text: chars[start..i].iter().collect(),
                line,
            });
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    out
}

/// The text with comments (doc comments included), string literals and char literals
/// replaced by spaces; newlines are kept so lines still count.
fn code_only(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let mut out = chars.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for c in &mut out[from..to.min(chars.len())] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let ident_before = |i: usize| i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            let end = (i..chars.len())
                .find(|&k| chars[k] == '\n')
                .unwrap_or(chars.len());
            blank(&mut out, i, end);
            i = end;
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let (mut depth, mut k) = (1, i + 2);
            while k < chars.len() && depth > 0 {
                if chars[k] == '/' && chars.get(k + 1) == Some(&'*') {
                    depth += 1;
                    k += 2;
                } else if chars[k] == '*' && chars.get(k + 1) == Some(&'/') {
                    depth -= 1;
                    k += 2;
                } else {
                    k += 1;
                }
            }
            blank(&mut out, i, k);
            i = k;
        } else if (c == 'r' || (c == 'b' && next == Some('r'))) && !ident_before(i) {
            // Raw strings: r"..", r#".."#, br"..".
            let mut k = if c == 'b' { i + 2 } else { i + 1 };
            let hashes = (k..chars.len()).take_while(|&m| chars[m] == '#').count();
            k += hashes;
            if chars.get(k) != Some(&'"') {
                i += 1;
                continue;
            }
            k += 1;
            let closing: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while k < chars.len() && !chars[k..].starts_with(&closing) {
                k += 1;
            }
            let end = (k + closing.len()).min(chars.len());
            blank(&mut out, i, end);
            i = end;
        } else if c == '"' {
            let mut k = i + 1;
            while k < chars.len() && chars[k] != '"' {
                k += if chars[k] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i, k + 1);
            i = k + 1;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{..}') or a lifetime ('a), which stays.
            let end = if next == Some('\\') {
                (i + 2..chars.len())
                    .find(|&k| chars[k] == '\'')
                    .map(|k| k + 1)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// Blanks `#[cfg(test)]` modules with a body (`mod tests { ... }`): tests may reach
/// anywhere, and are not part of the layering. Returns the text and the names of
/// `#[cfg(test)] mod name;` declarations, whose files are test-only. Expects comments and
/// strings gone.
fn strip_test_modules(code: &str) -> (String, Vec<String>) {
    let mut chars: Vec<char> = code.chars().collect();
    let mut test_files = Vec::new();
    let attr: Vec<char> = "#[cfg(test)]".chars().collect();
    let skip_ws = |k: &mut usize, chars: &[char]| {
        while *k < chars.len() && chars[*k].is_whitespace() {
            *k += 1;
        }
    };
    let word = |k: usize, chars: &[char], w: &str| {
        let w: Vec<char> = w.chars().collect();
        chars[k.min(chars.len())..].starts_with(&w)
            && chars.get(k + w.len()).is_some_and(|c| c.is_whitespace())
    };
    let mut start = 0;
    while start < chars.len() {
        if !chars[start..].starts_with(&attr) {
            start += 1;
            continue;
        }
        let mut k = start + attr.len();
        skip_ws(&mut k, &chars);
        // Further attributes (`#[allow(...)]`) between the cfg and the item.
        while chars.get(k) == Some(&'#') && chars.get(k + 1) == Some(&'[') {
            match (k..chars.len()).find(|&m| chars[m] == ']') {
                Some(close) => k = close + 1,
                None => break,
            }
            skip_ws(&mut k, &chars);
        }
        if word(k, &chars, "pub") {
            k += 3;
            skip_ws(&mut k, &chars);
        }
        if !word(k, &chars, "mod") {
            start += 1;
            continue;
        }
        let Some(open) = (k..chars.len()).find(|&m| chars[m] == '{' || chars[m] == ';') else {
            break;
        };
        if chars[open] == ';' {
            let name: String = chars[k + 3..open].iter().collect();
            test_files.push(name.trim().to_string());
            start = open;
            continue;
        }
        let mut depth = 0;
        let mut end = chars.len();
        for (m, &c) in chars.iter().enumerate().skip(open) {
            if c == '{' {
                depth += 1;
            } else if c == '}' {
                depth -= 1;
                if depth == 0 {
                    end = m + 1;
                    break;
                }
            }
        }
        for c in &mut chars[start..end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        start = end;
    }
    (chars.into_iter().collect(), test_files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Vec<Cycle> {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(f, t)| (f.to_string(), t.to_string()))
            .collect();
        find_cycles(&files)
    }

    #[test]
    fn a_two_module_cycle_is_found_with_both_edges_located() {
        let cycles = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            ("a/mod.rs", "pub mod x;\n"),
            ("a/x.rs", "\n\nuse crate::b::Thing;\n"),
            ("b.rs", "fn f() {\n    crate::a::x::g();\n}\n"),
        ]);
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        let c = &cycles[0];
        assert_eq!(c.parent, "");
        assert_eq!(c.members, ["a", "b"]);
        let edges: Vec<(&str, &str, &str, usize)> = c
            .edges
            .iter()
            .map(|(a, b, w)| (a.as_str(), b.as_str(), w.file.as_str(), w.line))
            .collect();
        assert_eq!(edges, [("a", "b", "a/x.rs", 3), ("b", "a", "b.rs", 2)]);
        let text = report(&cycles);
        assert!(
            text.contains("a -> b: gateway/src/a/x.rs:3 (crate::b::Thing), 1 use(s)"),
            "{text}"
        );
    }

    #[test]
    fn a_layered_tree_has_no_cycle() {
        let cycles = tree(&[
            ("lib.rs", "pub mod top;\npub mod mid;\npub mod low;\n"),
            (
                "main.rs",
                "use gateway::top::run;\nuse gateway::{low::x, mid};\n",
            ),
            ("top.rs", "use crate::{mid::M, low::{self, L}};\n"),
            (
                "mid/mod.rs",
                "pub mod one;\npub mod two;\nuse crate::low::L;\npub use one::M;\n",
            ),
            (
                "mid/one.rs",
                "use super::two::T;\nuse crate::mid::two;\nuse super::super::low::L;\n",
            ),
            (
                "mid/two.rs",
                "use super::Thing;\nuse crate::mid::Thing as Other;\n",
            ),
            ("low.rs", "pub struct L;\n"),
        ]);
        assert_eq!(cycles, []);
    }

    #[test]
    fn comments_strings_and_test_modules_do_not_count() {
        let cycles = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            ("a.rs", "use crate::b::B;\n"),
            (
                "b.rs",
                r####"//! See crate::a::A.
/// Unlike crate::a::A, ...
// crate::a
/* crate::a::A /* nested */ crate::a */
const S: &str = "crate::a::A";
const R: &str = r#"crate::a "quoted" ::A"#;
const C: char = '"';
fn f<'a>(x: &'a str) -> &'a str { x }
#[cfg(test)]
mod tests {
    use crate::a::A;
    fn g() { let _ = crate::a::A; }
}
"####,
            ),
        ]);
        assert_eq!(cycles, []);
    }

    #[test]
    fn methods_written_in_another_module_are_its_dependency() {
        // `b` never names `a`, but calls methods of its own type that live in `a`.
        let files = [
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            (
                "a.rs",
                "use crate::b::Settings;\n\nimpl Settings {\n    fn check(&self) {}\n}\n",
            ),
            (
                "b.rs",
                "pub struct Settings;\nfn f(s: &Settings) { s.check() }\n",
            ),
        ];
        let cycles = tree(&files);
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        let (from, to, w) = &cycles[0].edges[1];
        assert_eq!(
            (from.as_str(), to.as_str(), w.line),
            ("b", "a", 3),
            "{cycles:?}"
        );
        assert_eq!(w.path, "impl Settings");
        // Trait impls, impls of local types and `impl Trait` in signatures are not.
        let cycles = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            (
                "a.rs",
                "use crate::b::Settings;\nstruct Local;\nimpl Local {}\n\
                 struct Kind;\nfn g() { let _ = crate::b::Enum::Kind; }\nimpl Kind {}\n\
                 fn h() { let _ = crate::b::Enum::Other; }\nimpl Other {}\n\
                 impl<T> std::fmt::Debug for Settings {}\n\
                 impl Clone for crate::b::Settings {}\n\
                 fn f() -> impl Iterator<Item = u8> { std::iter::empty() }\n",
            ),
            ("b.rs", "pub struct Settings;\n"),
        ]);
        assert_eq!(cycles, []);
    }

    #[test]
    fn test_only_module_files_do_not_count() {
        let cycles = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            (
                "a/mod.rs",
                "#[cfg(test)]\n#[allow(dead_code)]\npub mod kit;\nuse crate::b::B;\n",
            ),
            ("a/kit/mod.rs", "use crate::b::B;\n"),
            ("a/kit/deep.rs", "use crate::b::B;\n"),
            (
                "b.rs",
                "#[cfg(test)]\n#[allow(unused)]\nmod tests {\n    use crate::a::kit;\n}\n",
            ),
        ]);
        assert_eq!(cycles, []);
        // The same use outside the test module is an edge, and closes the cycle.
        let cycles = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            ("a/mod.rs", "use crate::b::B;\n"),
            ("b.rs", "#[cfg(test)]\nmod tests {}\nuse crate::a::A;\n"),
        ]);
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].edges[1].2.line, 3);
    }

    #[test]
    fn nested_siblings_and_super_paths_form_cycles_too() {
        let cycles = tree(&[
            ("lib.rs", "pub mod io;\n"),
            (
                "io/mod.rs",
                "pub mod uring;\npub mod sockets;\npub mod connect;\n",
            ),
            ("io/uring.rs", "use super::sockets::WatchedFd;\n"),
            ("io/sockets.rs", "use super::connect::c;\n"),
            (
                "io/connect.rs",
                "fn f() { super::uring::UringStream::new(); }\n",
            ),
        ]);
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].parent, "io");
        assert_eq!(cycles[0].members, ["connect", "sockets", "uring"]);
        assert_eq!(cycles[0].edges.len(), 3);
    }

    #[test]
    fn the_binary_sees_the_library_through_its_name() {
        // main -> a only; a cannot name main, so there is no cycle, but the edge is seen.
        let files = [
            ("lib.rs", "pub mod a;\n"),
            ("a.rs", ""),
            ("main.rs", "use gateway::a;\nuse crate::cli;\n"),
        ];
        assert_eq!(tree(&files), []);
        let (uses, _) = paths_in("use gateway::a::{b, c as d};\nuse crate::cli;\n", true);
        let texts: Vec<&str> = uses.iter().map(|u| u.text.as_str()).collect();
        assert_eq!(texts, ["gateway::a::b", "gateway::a::c"]);
    }

    #[test]
    fn module_paths_follow_the_file_layout() {
        assert_eq!(module_of("lib.rs"), Vec::<String>::new());
        assert_eq!(module_of("main.rs"), ["main"]);
        assert_eq!(module_of("io/mod.rs"), ["io"]);
        assert_eq!(module_of("io/uring.rs"), ["io", "uring"]);
        assert_eq!(module_of("snapshot.rs"), ["snapshot"]);
    }
}
