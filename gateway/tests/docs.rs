//! The documentation keeps in step: docs/configuration.md lists exactly the flags, variables and
//! defaults of `sse-gateway --help` and of each subcommand's, and every relative link and
//! `#anchor` in the markdown files resolves. Markdown is parsed with pulldown-cmark, offline;
//! lychee is not used: it is a network link checker, far more than relative links need.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use support::{repo, ENV_ONLY};

/// The reference the flag check reads.
const REFERENCE: &str = "docs/configuration.md";

/// A command as the reference's headings name it: `sse-gateway`, `sse-gateway publish`, ...
fn command_name(subcommand: &str) -> String {
    if subcommand.is_empty() {
        "sse-gateway".to_string()
    } else {
        format!("sse-gateway {subcommand}")
    }
}

/// What one flag says about itself, in `--help` or in the reference.
#[derive(Debug, Default)]
struct Flag {
    env: Option<String>,
    /// In help: every `[default: X]`. In the reference: every code span of the default column.
    defaults: Vec<String>,
}

/// Runs `sse-gateway [subcommand] --help` with no `SSEGW_*` set (help would show their values).
fn help(subcommand: &str) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
    command.env_clear();
    if !subcommand.is_empty() {
        command.arg(subcommand);
    }
    let out = command.arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "`{} --help` failed: {}",
        command_name(subcommand),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands listed under `Commands:` in the top-level help, less clap's `help`.
fn subcommands(top_help: &str) -> Vec<String> {
    top_help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags of a help text with their variables and defaults. clap's long help puts
/// each flag on a line indented by 2 or 6 spaces (`  -h, --help`, `      --listen <LISTEN>`)
/// and its description on the lines below, indented further; the description ends with
/// `[env: VAR=]` (`[env: VAR]` for hidden values) and `[default: X]`.
fn help_flags(help: &str) -> BTreeMap<String, Flag> {
    let mut flags: BTreeMap<String, Flag> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        if indent > 0 && indent < 10 && line.trim_start().starts_with('-') {
            let long = line
                .split_whitespace()
                .find(|word| word.starts_with("--"))
                .map(|word| word.trim_end_matches(',').to_string());
            if let Some(long) = &long {
                flags.insert(long.clone(), Flag::default());
            }
            current = long;
        } else if indent == 0 {
            current = None;
        } else if let Some(flag) = current.as_ref().and_then(|f| flags.get_mut(f)) {
            for (start, value) in bracketed(line) {
                match start {
                    "env" => flag.env = Some(value.split('=').next().unwrap().to_string()),
                    "default" => flag.defaults.push(value.to_string()),
                    _ => {}
                }
            }
        }
    }
    flags
}

/// `[key: value]` pairs in a line of help.
fn bracketed(line: &str) -> Vec<(&str, &str)> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        if let Some((key, value)) = rest[..close].split_once(": ") {
            found.push((key, value));
        }
        rest = &rest[close + 1..];
    }
    found
}

/// A piece of a table cell: plain text or a code span.
#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Code(String),
}

fn codes(cell: &[Piece]) -> Vec<String> {
    cell.iter()
        .filter_map(|p| match p {
            Piece::Code(c) => Some(c.clone()),
            Piece::Text(_) => None,
        })
        .collect()
}

fn plain(cell: &[Piece]) -> String {
    cell.iter()
        .map(|p| match p {
            Piece::Text(t) | Piece::Code(t) => t.as_str(),
        })
        .collect::<String>()
        .trim()
        .to_string()
}

/// The reference, read: per command (`""` for the top level, else the subcommand), its
/// documented flags; the environment-only variables; and whatever does not fit the form.
#[derive(Debug, Default)]
struct Reference {
    commands: BTreeMap<String, BTreeMap<String, Flag>>,
    env_only: BTreeSet<String>,
    problems: Vec<String>,
}

/// Reads the reference: a heading whose code spans name commands (`sse-gateway`,
/// `sse-gateway publish`) makes the tables below it, down to the next heading of its level or
/// above, belong to those commands. A row `| \`--flag\` | \`VAR\` | default | meaning |`
/// documents a flag; a row with an empty first cell documents an environment-only variable.
fn read_reference(markdown: &str) -> Reference {
    let mut reference = Reference::default();
    // Commands named by the open headings, per level (1 to 6).
    let mut named: Vec<(usize, Vec<String>)> = Vec::new();
    let mut heading: Option<(usize, Vec<String>)> = None;
    let mut row: Option<Vec<Vec<Piece>>> = None;
    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::Heading { level, .. }) => heading = Some((level as usize, vec![])),
            // A heading's code spans that name commands; other code spans in a heading are
            // not in a table row either, so the arm below ignores them.
            Event::Code(code)
                if heading.is_some()
                    && (&*code == "sse-gateway" || code.starts_with("sse-gateway ")) =>
            {
                let sub = code.trim_start_matches("sse-gateway").trim().to_string();
                heading.as_mut().unwrap().1.push(sub);
            }
            Event::End(TagEnd::Heading(_)) => {
                let (level, commands) = heading.take().unwrap();
                named.retain(|(l, _)| *l < level);
                named.push((level, commands));
            }
            Event::Start(Tag::TableRow) => row = Some(vec![]),
            Event::Start(Tag::TableCell) => {
                if let Some(row) = row.as_mut() {
                    row.push(vec![]);
                }
            }
            Event::Text(text) => {
                if let Some(cell) = row.as_mut().and_then(|r| r.last_mut()) {
                    cell.push(Piece::Text(text.to_string()));
                }
            }
            Event::Code(code) => {
                if let Some(cell) = row.as_mut().and_then(|r| r.last_mut()) {
                    cell.push(Piece::Code(code.to_string()));
                }
            }
            Event::End(TagEnd::TableRow) => {
                let cells = row.take().unwrap();
                let commands = named
                    .iter()
                    .rev()
                    .find(|(_, c)| !c.is_empty())
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default();
                read_row(&mut reference, &commands, &cells);
            }
            _ => {}
        }
    }
    reference
}

fn read_row(reference: &mut Reference, commands: &[String], cells: &[Vec<Piece>]) {
    let described = plain(&cells.iter().flatten().cloned().collect::<Vec<_>>());
    if cells.len() != 4 {
        reference
            .problems
            .push(format!("row without 4 cells: {described}"));
        return;
    }
    let env = codes(&cells[1]).into_iter().next();
    match codes(&cells[0]).first() {
        Some(flag) if flag.starts_with("--") => {
            if commands.is_empty() {
                reference
                    .problems
                    .push(format!("{flag} is under no heading naming a command"));
            }
            for command in commands {
                let documented = reference.commands.entry(command.clone()).or_default();
                let row = Flag {
                    env: env.clone(),
                    defaults: codes(&cells[2]),
                };
                if documented.insert(flag.clone(), row).is_some() {
                    reference.problems.push(format!(
                        "{flag} is documented twice for `{}`",
                        command_name(command)
                    ));
                }
            }
        }
        None if plain(&cells[0]).is_empty() && env.is_some() => {
            reference.env_only.insert(env.unwrap());
        }
        _ => reference
            .problems
            .push(format!("row that documents no flag: {described}")),
    }
}

/// Differences between one command's help and its part of the reference.
fn compare(
    command: &str,
    help: &BTreeMap<String, Flag>,
    documented: &BTreeMap<String, Flag>,
) -> Vec<String> {
    let name = command_name(command);
    let mut problems = Vec::new();
    for (flag, in_help) in help {
        let Some(in_docs) = documented.get(flag) else {
            problems.push(format!(
                "`{name} --help` has {flag}, which {REFERENCE} does not document for `{name}`"
            ));
            continue;
        };
        if in_help.env != in_docs.env {
            problems.push(format!(
                "`{name} {flag}`: help names the variable {:?}, {REFERENCE} {:?}",
                in_help.env, in_docs.env
            ));
        }
        for default in &in_help.defaults {
            if !in_docs.defaults.contains(default) {
                problems.push(format!(
                    "`{name} {flag}`: help gives the default `{default}`, {REFERENCE} {:?}",
                    in_docs.defaults
                ));
            }
        }
    }
    for flag in documented.keys().filter(|f| !help.contains_key(*f)) {
        problems.push(format!(
            "{REFERENCE} documents {flag} for `{name}`, which `{name} --help` does not have"
        ));
    }
    problems
}

/// Every problem the flag check finds, given the help of each command and the reference.
fn flag_problems(helps: &BTreeMap<String, String>, reference: &Reference) -> Vec<String> {
    let mut problems = reference.problems.clone();
    let none = BTreeMap::new();
    let mut help_variables = BTreeSet::new();
    for (command, help) in helps {
        let flags = help_flags(help);
        help_variables.extend(flags.values().filter_map(|f| f.env.clone()));
        let documented = reference.commands.get(command).unwrap_or(&none);
        problems.extend(compare(command, &flags, documented));
    }
    for command in reference
        .commands
        .keys()
        .filter(|c| !helps.contains_key(*c))
    {
        problems.push(format!(
            "{REFERENCE} documents `{}`, which is no command of sse-gateway",
            command_name(command)
        ));
    }
    for variable in ENV_ONLY {
        if !reference.env_only.contains(variable) {
            problems.push(format!(
                "{REFERENCE} does not document the environment-only {variable}"
            ));
        }
    }
    for variable in &reference.env_only {
        if help_variables.contains(variable) {
            problems.push(format!(
                "{REFERENCE} documents {variable} as environment-only, but a flag reads it"
            ));
        }
        if !(variable.starts_with("SSEGW_") || variable.starts_with("OTEL_")) {
            problems.push(format!(
                "{REFERENCE} documents {variable}, no setting of sse-gateway"
            ));
        }
    }
    problems
}

fn all_helps() -> BTreeMap<String, String> {
    let top = help("");
    let mut helps = BTreeMap::new();
    for sub in subcommands(&top) {
        helps.insert(sub.clone(), help(&sub));
    }
    helps.insert(String::new(), top);
    helps
}

#[test]
fn the_configuration_reference_matches_every_commands_help() {
    let helps = all_helps();
    assert!(
        ["serve", "publish", "script"]
            .iter()
            .all(|s| helps.contains_key(*s)),
        "subcommands found in --help: {:?}",
        helps.keys().collect::<Vec<_>>()
    );
    assert!(help_flags(&helps[""]).contains_key("--listen"));
    let markdown = std::fs::read_to_string(repo().join(REFERENCE)).unwrap();
    let problems = flag_problems(&helps, &read_reference(&markdown));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_flag_check_finds_a_missing_and_a_bogus_flag() {
    let helps = all_helps();
    let markdown = std::fs::read_to_string(repo().join(REFERENCE)).unwrap();

    let listen = markdown
        .lines()
        .find(|l| l.starts_with("| `--listen` |"))
        .unwrap();
    let without_listen = markdown.replace(&format!("{listen}\n"), "");
    let problems = flag_problems(&helps, &read_reference(&without_listen));
    assert!(
        problems.iter().any(|p| p.contains("has --listen")
            && p.contains("`sse-gateway`")
            && p.contains("does not document")),
        "{problems:?}"
    );
    assert!(problems.iter().any(|p| p.contains("`sse-gateway serve`")));

    let bogus = markdown.replace(
        "| `--eval` |",
        "| `--bogus` | `SSEGW_BOGUS` | none | no such flag |\n| `--eval` |",
    );
    let problems = flag_problems(&helps, &read_reference(&bogus));
    assert_eq!(
        problems,
        vec![format!(
            "{REFERENCE} documents --bogus for `sse-gateway script`, which `sse-gateway script --help` does not have"
        )]
    );

    let wrong_variable = markdown.replace("| `SSEGW_TOKEN` |", "| `SSEGW_TOKENS` |");
    let problems = flag_problems(&helps, &read_reference(&wrong_variable));
    assert!(
        problems.len() == 1 && problems[0].contains("SSEGW_TOKENS"),
        "{problems:?}"
    );
}

/// GitHub's anchor for a heading's text: lower case, punctuation other than `-` and `_`
/// dropped, spaces turned into `-`.
fn slug(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings; the second of a slug gets `-1`, the third `-2`...
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = BTreeSet::new();
    let mut text: Option<String> = None;
    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::Heading { .. }) => text = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(text) = text.as_mut() {
                    text.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&text.take().unwrap());
                let n = seen.entry(base.clone()).or_insert(0);
                anchors.insert(if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                });
                *n += 1;
            }
            _ => {}
        }
    }
    anchors
}

/// Every link and image target of a markdown file.
fn links(markdown: &str) -> Vec<String> {
    Parser::new_ext(markdown, Options::ENABLE_TABLES)
        .filter_map(|event| match event {
            Event::Start(Tag::Link { dest_url, .. })
            | Event::Start(Tag::Image { dest_url, .. }) => Some(dest_url.to_string()),
            _ => None,
        })
        .collect()
}

/// What is wrong with one link of `file` (a path under `root`), if anything. Links with a
/// scheme (`https:`, `mailto:`) are not checked.
fn broken(
    root: &Path,
    file: &Path,
    link: &str,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Option<String> {
    if link.contains("://") || link.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match link.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (link, None),
    };
    let target = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent().unwrap().join(path)
    };
    let Some(anchor) = anchor else {
        return (!root.join(&target).exists()).then(|| format!("{link}: no such file"));
    };
    let Some(markdown) = read(&target) else {
        return Some(format!("{link}: no markdown file to hold #{anchor}"));
    };
    (!anchors(&markdown).contains(anchor))
        .then(|| format!("{link}: {} has no heading #{anchor}", target.display()))
}

fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"]
        .map(PathBuf::from)
        .to_vec();
    let mut dirs = vec![PathBuf::from("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(root.join(&dir)).unwrap() {
            let path = dir.join(entry.unwrap().file_name());
            if root.join(&path).is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files
}

/// Every broken link of the given files, as `file: link: what is wrong`.
fn broken_links(root: &Path, files: &BTreeMap<PathBuf, String>) -> Vec<String> {
    let read = |path: &Path| -> Option<String> {
        let path = normalize(path);
        files
            .get(&path)
            .cloned()
            .or_else(|| std::fs::read_to_string(root.join(&path)).ok())
            .filter(|_| path.extension().is_some_and(|e| e == "md"))
    };
    let mut problems = Vec::new();
    for (file, markdown) in files {
        for link in links(markdown) {
            if let Some(problem) = broken(root, file, &link, &read) {
                problems.push(format!("{}: {problem}", file.display()));
            }
        }
    }
    problems
}

/// `docs/../README.md` as `README.md`, so that files given in memory are found by any path.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn read_all(root: &Path) -> BTreeMap<PathBuf, String> {
    markdown_files(root)
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(root.join(&f)).unwrap();
            (f, text)
        })
        .collect()
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let root = repo();
    let files = read_all(&root);
    assert!(files.len() > 10, "{:?}", files.keys());
    assert!(
        files.values().map(|m| links(m).len()).sum::<usize>() > 50,
        "too few links found: is the parser reading them?"
    );
    let problems = broken_links(&root, &files);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_link_check_finds_a_broken_link_and_a_broken_anchor() {
    let root = repo();
    let mut files = read_all(&root);
    let index = PathBuf::from("docs/README.md");
    let original = files[&index].clone();
    files.insert(
        index.clone(),
        format!("{original}\n[gone](no-such-page.md) [bad](configuration.md#no-such-heading) [self](#nowhere)\n"),
    );
    let problems = broken_links(&root, &files);
    assert_eq!(
        problems,
        vec![
            "docs/README.md: no-such-page.md: no such file".to_string(),
            "docs/README.md: configuration.md#no-such-heading: docs/configuration.md has no heading #no-such-heading".to_string(),
            "docs/README.md: #nowhere: docs/README.md has no heading #nowhere".to_string(),
        ]
    );
}

#[test]
fn slugs_follow_githubs_rules() {
    let check = |markdown: &str, expected: &[&str]| {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(anchors(markdown), expected, "{markdown}");
    };
    check("# HTTP/2 and TLS", &["http2-and-tls"]);
    check(
        "## The control event: `ssegw-gap`",
        &["the-control-event-ssegw-gap"],
    );
    check("# A\n# A\n# A", &["a", "a-1", "a-2"]);
    check("## `sse-gateway publish`", &["sse-gateway-publish"]);
    check(
        "### snake_case, (parens) & more!",
        &["snake_case-parens--more"],
    );
}
