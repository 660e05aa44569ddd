//! `pipelines/<name>/segments/**.toml`: one segment per file.
//!
//! A segment's name is its path under `segments/` without `.toml`; the folders on that path are
//! its folders (`engagement/uk_frequent_buyers` lives in the folder `engagement`). A file holds
//! the segment's rule and its activations. This module loads every file, checks each rule
//! against the master segment's columns, checks references between segments (unknown names and
//! cycles, naming the cycle) and orders segments so each comes after those it refers to.
//!
//! When the pipeline's tables or `config.toml` cannot be used, the segments are still checked
//! as far as they can be without them: without the tables, rules are checked for their form
//! only; without `config.toml`, activations are checked up to their connection.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{DaemonConfig, Problem, SourceText, is_identifier, read_text};
use crate::rules::{Catalog, RawCondition, Reference, Rule};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    description: Option<String>,
    rule: Option<Spanned<RawCondition>>,
    #[serde(default)]
    activations: Vec<Spanned<RawActivation>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivation {
    name: Spanned<String>,
    connection: Spanned<String>,
    #[serde(default)]
    identifiers: Vec<Spanned<String>>,
    #[serde(default)]
    settings: toml::Table,
    mode: Option<Spanned<String>>,
    max_removal_share: Option<Spanned<f64>>,
    min_audience_size: Option<Spanned<u64>>,
    dead_letter_after_runs: Option<Spanned<u32>>,
}

/// One checked segment.
#[derive(Debug, Clone)]
pub struct SegmentDef {
    /// Path under `segments/` without `.toml`, with `/` between folders.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// What it is for.
    pub description: String,
    /// Its rule.
    pub rule: Rule,
    /// Segments its rule refers to.
    pub references: Vec<String>,
    /// Where its members are sent.
    pub activations: Vec<ActivationDef>,
}

impl SegmentDef {
    /// The folder holding the segment (empty at the top).
    pub fn folder(&self) -> &str {
        self.name.rsplit_once('/').map_or("", |(folder, _)| folder)
    }
}

/// One activation: a segment sent to one destination.
#[derive(Debug, Clone)]
pub struct ActivationDef {
    /// `<segment>/<name>`: unique within the pipeline; the key of its acknowledged state.
    pub id: String,
    /// The connection it sends through.
    pub connection: String,
    /// The connector type of that connection.
    pub kind: String,
    /// Master or attribute columns sent with each member.
    pub identifiers: Vec<String>,
    /// The activation's own connector settings.
    pub settings: toml::Table,
    /// Whether removes are sent.
    pub mode: Mode,
    /// The largest share of the acknowledged audience one run may remove before the delta is
    /// held for an operator's approval (`max_removal_share`, default 0.2).
    pub max_removal_share: f64,
    /// The smallest audience removals may leave on the destination (`min_audience_size`,
    /// default the platform's own floor, if it has one); removals that would go below it are
    /// held for an operator's approval. 0 turns the check off.
    pub min_audience_size: Option<u64>,
    /// After how many runs in which the platform rejected a member it goes to the dead
    /// letter (`dead_letter_after_runs`, default 3).
    pub dead_letter_after_runs: u32,
    /// The platform list it keeps, in words, when its connector keeps one.
    pub destination: Option<String>,
    /// The line of its `name` in the segment file.
    pub line: usize,
}

/// How an activation treats members who leave the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Send adds and removes (`add_remove`, the default).
    AddRemove,
    /// Send adds only; members who leave stay on the destination (`add_only`).
    AddOnly,
    /// Replace the destination's whole list with the segment's members every run (`mirror`),
    /// so members added or removed on the platform by other means are put right too. Only
    /// connections whose platform can replace a list take it.
    Mirror,
}

/// The default of `max_removal_share`.
pub const DEFAULT_MAX_REMOVAL_SHARE: f64 = 0.2;

/// The default of `dead_letter_after_runs`.
pub const DEFAULT_DEAD_LETTER_AFTER_RUNS: u32 = 3;

/// Every `.toml` file under `dir`, sorted.
fn segment_files(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            segment_files(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    Ok(())
}

/// A segment file's references to other segments, with their lines.
struct FileReferences {
    file: PathBuf,
    references: Vec<(String, usize)>,
}

/// Loads every segment of a pipeline, in dependency order. Without a `catalog` (the
/// pipeline's tables have problems) rules are checked for their form only; without `daemon`
/// (`config.toml` has problems) activations are not checked against connections.
pub(super) fn load_all(
    pipeline_dir: &Path,
    pipeline: &str,
    catalog: Option<&Catalog>,
    daemon: Option<&DaemonConfig>,
    problems: &mut Vec<Problem>,
) -> Vec<SegmentDef> {
    let root = pipeline_dir.join("segments");
    let mut files = Vec::new();
    if root.is_dir()
        && let Err(err) = segment_files(&root, &mut files)
    {
        problems.push(Problem {
            file: root.clone(),
            line: None,
            message: format!("cannot read the segments folder: {err}"),
        });
    }

    let mut segments = Vec::new();
    let mut lines: BTreeMap<String, FileReferences> = BTreeMap::new();
    for file in files {
        let relative = file
            .strip_prefix(&root)
            .expect("under root")
            .with_extension("");
        let name = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let (segment, references) = load_one(&file, &name, pipeline, catalog, daemon, problems);
        lines.insert(name.clone(), FileReferences { file, references });
        segments.extend(segment);
    }

    // References: every name must exist, as a file; a segment with problems of its own
    // still exists, and its own references are checked too.
    let known: BTreeSet<&str> = lines.keys().map(String::as_str).collect();
    for FileReferences { file, references } in lines.values() {
        for (reference, line) in references {
            if !known.contains(reference.as_str()) {
                problems.push(Problem {
                    file: file.clone(),
                    line: Some(*line),
                    message: format!(
                        "the rule refers to segment `{reference}`, which does not exist in this \
                         pipeline (segments are named by their path under segments/, without .toml)"
                    ),
                });
            }
        }
    }

    report_cycles(pipeline_dir, &lines, problems);
    report_shared_destinations(&segments, problems);
    order_by_dependency(segments)
}

/// Two activations keeping one platform list through one connection undo each other's
/// changes (one removes whom the other adds, a replace drops the other's members), unless both
/// only add.
fn report_shared_destinations(segments: &[SegmentDef], problems: &mut Vec<Problem>) {
    let mut keepers: BTreeMap<(&str, &str), (&SegmentDef, &ActivationDef)> = BTreeMap::new();
    for segment in segments {
        for activation in &segment.activations {
            let Some(destination) = &activation.destination else {
                continue;
            };
            let key = (activation.connection.as_str(), destination.as_str());
            let Some((first_segment, first)) = keepers.get(&key) else {
                keepers.insert(key, (segment, activation));
                continue;
            };
            if first.mode == Mode::AddOnly && activation.mode == Mode::AddOnly {
                continue;
            }
            problems.push(Problem {
                file: segment.file.clone(),
                line: Some(activation.line),
                message: format!(
                    "activation `{}` keeps {destination} through connection `{}`, as activation \
                     `{}` does ({}:{}); the two would undo each other's changes. Give each its \
                     own list, or make both add_only",
                    activation.id,
                    activation.connection,
                    first.id,
                    first_segment.file.display(),
                    first.line
                ),
            });
        }
    }
}

fn load_one(
    file: &Path,
    name: &str,
    pipeline: &str,
    catalog: Option<&Catalog>,
    daemon: Option<&DaemonConfig>,
    problems: &mut Vec<Problem>,
) -> (Option<SegmentDef>, Vec<(String, usize)>) {
    let text = match read_text(file) {
        Ok(text) => text,
        Err(problem) => {
            problems.push(problem);
            return (None, Vec::new());
        }
    };
    let source = SourceText {
        path: file,
        text: &text,
    };
    if !name.split('/').all(is_identifier) {
        problems.push(source.problem(
            "segment files and folders are named in lower case letters, digits and `_`, \
             starting with a letter",
        ));
        return (None, Vec::new());
    }
    let raw: RawSegment = match source.parse() {
        Ok(raw) => raw,
        Err(problem) => {
            problems.push(problem);
            return (None, Vec::new());
        }
    };
    let before = problems.len();

    let empty = Spanned::new(0..0, RawCondition::default());
    let raw_rule = raw.rule.as_ref().unwrap_or(&empty);
    let (rule, rule_problems, references): (Rule, Vec<_>, Vec<Reference>) = match catalog {
        Some(catalog) => {
            let checked = crate::rules::check(raw_rule, catalog);
            match checked.rule {
                Ok(rule) => (rule, Vec::new(), checked.references),
                Err(rule_problems) => (Rule::Everyone, rule_problems, checked.references),
            }
        }
        None => {
            let (rule_problems, references) = crate::rules::check_form(raw_rule);
            (Rule::Everyone, rule_problems, references)
        }
    };
    for problem in rule_problems {
        problems.push(source.problem_at_offset(problem.offset, problem.message));
    }
    let references_with_lines = references
        .iter()
        .map(|r| (r.segment.clone(), source.line_of(r.offset)))
        .collect();
    if let Some(itself) = references.iter().find(|r| r.segment == name) {
        problems.push(source.problem_at_offset(
            itself.offset,
            format!(
                "the rule of `{name}` refers to itself; a segment cannot be part of its own \
                 rule, so remove this reference"
            ),
        ));
    }
    let references: Vec<String> = references.into_iter().map(|r| r.segment).collect();

    let mut activations: Vec<ActivationDef> = Vec::new();
    let mut names = BTreeSet::new();
    for activation in &raw.activations {
        let spec = activation.get_ref();
        let activation_name = spec.name.get_ref();
        if !is_identifier(activation_name) {
            problems.push(source.problem_at(
                &spec.name,
                "activation names are lower case letters, digits and `_`, starting with a letter",
            ));
            continue;
        }
        if !names.insert(activation_name.clone()) {
            problems.push(source.problem_at(
                &spec.name,
                format!("two activations are called `{activation_name}`"),
            ));
            continue;
        }
        for identifier in &spec.identifiers {
            if let Some(catalog) = catalog
                && catalog.attribute(identifier.get_ref()).is_none()
            {
                problems.push(source.problem_at(
                    identifier,
                    format!(
                        "identifier `{}` is not a master or attribute column",
                        identifier.get_ref()
                    ),
                ));
            }
        }
        // Every problem of the activation is reported, not only the first; what needs the
        // connection waits without config.toml.
        let mut bad = false;
        let connection = match daemon {
            None => None,
            Some(daemon) => match daemon.connections.get(spec.connection.get_ref()) {
                Some(connection) => Some(connection),
                None => {
                    let known: Vec<&str> = daemon.connections.keys().map(String::as_str).collect();
                    problems.push(source.problem_at(
                        &spec.connection,
                        format!(
                            "there is no connection `{}` in {}; connections: {}",
                            spec.connection.get_ref(),
                            daemon.path.display(),
                            known.join(", ")
                        ),
                    ));
                    bad = true;
                    None
                }
            },
        };
        let connector = connection.and_then(|connection| {
            match segmentd_connectors::build(
                &connection.kind,
                &connection.settings,
                &spec.settings,
                &connection.secrets,
            ) {
                Ok(connector) => Some(connector),
                Err(errors) => {
                    // The connection's own problems are reported once, at the connection.
                    for error in errors
                        .into_iter()
                        .filter(|error| !connection.reported(error))
                    {
                        problems.push(source.problem_at(
                            activation,
                            format!("activation `{activation_name}`: settings.{error}"),
                        ));
                    }
                    bad = true;
                    None
                }
            }
        });
        let min_audience_size = match &spec.min_audience_size {
            Some(size) => Some(*size.get_ref()).filter(|size| *size > 0),
            None => connector.as_ref().and_then(|c| c.min_audience_size()),
        };
        let mode = match spec.mode.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("add_remove") => Mode::AddRemove,
            Some("add_only") => Mode::AddOnly,
            // Whether the connection can replace a list is known once it is built.
            Some("mirror") if connector.as_ref().is_none_or(|c| c.replaces_lists()) => Mode::Mirror,
            Some("mirror") => {
                let kind = connection.map_or("", |c| c.kind.as_str());
                problems.push(source.problem_at(
                    spec.mode.as_ref().expect("set"),
                    format!(
                        "activation `{activation_name}`: connection type `{}` cannot replace a \
                         whole list, so `mirror` is not available (connection types that can: \
                         {}); use add_remove or add_only",
                        kind,
                        segmentd_connectors::REPLACING_KINDS.join(", ")
                    ),
                ));
                bad = true;
                Mode::AddRemove
            }
            Some(other) => {
                problems.push(source.problem_at(
                    spec.mode.as_ref().expect("set"),
                    format!(
                        "activation `{activation_name}`: mode `{other}` is not one of \
                         add_remove, add_only, mirror"
                    ),
                ));
                bad = true;
                Mode::AddRemove
            }
        };
        let max_removal_share = match &spec.max_removal_share {
            Some(share) if !(0.0..=1.0).contains(share.get_ref()) => {
                problems.push(source.problem_at(
                    share,
                    format!(
                        "activation `{activation_name}`: max_removal_share is a share from 0 \
                         to 1, such as 0.2"
                    ),
                ));
                bad = true;
                DEFAULT_MAX_REMOVAL_SHARE
            }
            Some(share) => *share.get_ref(),
            None => DEFAULT_MAX_REMOVAL_SHARE,
        };
        let dead_letter_after_runs = match &spec.dead_letter_after_runs {
            Some(runs) if *runs.get_ref() == 0 => {
                problems.push(source.problem_at(
                    runs,
                    format!(
                        "activation `{activation_name}`: dead_letter_after_runs must be 1 or more"
                    ),
                ));
                bad = true;
                DEFAULT_DEAD_LETTER_AFTER_RUNS
            }
            Some(runs) => *runs.get_ref(),
            None => DEFAULT_DEAD_LETTER_AFTER_RUNS,
        };
        let (Some(connection), Some(connector), false) = (connection, &connector, bad) else {
            continue;
        };
        let destination = connector.destination();
        let line = source.line_of(spec.name.span().start);
        activations.push(ActivationDef {
            destination,
            line,
            mode,
            max_removal_share,
            min_audience_size,
            dead_letter_after_runs,
            id: format!("{name}/{activation_name}"),
            connection: connection.name.clone(),
            kind: connection.kind.clone(),
            identifiers: spec
                .identifiers
                .iter()
                .map(|i| i.get_ref().clone())
                .collect(),
            settings: spec.settings.clone(),
        });
    }
    let _ = pipeline;

    if problems.len() > before {
        return (None, references_with_lines);
    }
    (
        Some(SegmentDef {
            name: name.to_string(),
            file: file.to_path_buf(),
            description: raw.description.unwrap_or_default(),
            rule,
            references,
            activations,
        }),
        references_with_lines,
    )
}

/// Reports each cycle of references between segment files once, at the reference that closes
/// it, naming every segment on it and where each reference is. Segment files with problems of
/// their own take part: their references were read all the same.
fn report_cycles(
    pipeline_dir: &Path,
    lines: &BTreeMap<String, FileReferences>,
    problems: &mut Vec<Problem>,
) {
    let mut done = BTreeSet::new();
    let mut reported = BTreeSet::new();
    for name in lines.keys() {
        let mut path = Vec::new();
        find_cycles(
            name,
            lines,
            pipeline_dir,
            &mut done,
            &mut path,
            &mut reported,
            problems,
        );
    }
}

/// Depth-first search from `name`; `path` holds the segments being visited, each with the line
/// of its reference to the next one.
fn find_cycles<'a>(
    name: &'a str,
    lines: &'a BTreeMap<String, FileReferences>,
    pipeline_dir: &Path,
    done: &mut BTreeSet<&'a str>,
    path: &mut Vec<(&'a str, usize)>,
    reported: &mut BTreeSet<Vec<&'a str>>,
    problems: &mut Vec<Problem>,
) {
    if done.contains(name) {
        return;
    }
    let Some(entry) = lines.get(name) else {
        return;
    };
    path.push((name, 0));
    for (reference, line) in &entry.references {
        // A segment referring to itself is reported where it is loaded.
        if reference == name {
            continue;
        }
        path.last_mut().expect("pushed").1 = *line;
        if let Some(start) = path.iter().position(|(p, _)| p == reference) {
            let cycle = &path[start..];
            let mut key: Vec<&str> = cycle.iter().map(|(n, _)| *n).collect();
            key.sort();
            if reported.insert(key) {
                problems.push(cycle_problem(pipeline_dir, lines, cycle));
            }
            continue;
        }
        find_cycles(
            reference,
            lines,
            pipeline_dir,
            done,
            path,
            reported,
            problems,
        );
    }
    path.pop();
    done.insert(name);
}

/// The problem for one cycle: `cycle` lists its segments in order, each with the line of its
/// reference to the next; the last one's reference, back to the first, closes it.
fn cycle_problem(
    pipeline_dir: &Path,
    lines: &BTreeMap<String, FileReferences>,
    cycle: &[(&str, usize)],
) -> Problem {
    let (last, closing_line) = cycle[cycle.len() - 1];
    let last_file = &lines[last].file;
    let names: Vec<&str> = cycle
        .iter()
        .map(|(n, _)| *n)
        .chain(std::iter::once(cycle[0].0))
        .collect();
    let mut steps: Vec<String> = cycle[..cycle.len() - 1]
        .iter()
        .enumerate()
        .map(|(i, (from, line))| {
            let file = &lines[*from].file;
            let shown = file.strip_prefix(pipeline_dir).unwrap_or(file);
            format!(
                "`{from}` refers to `{}` at {}:{line}",
                cycle[i + 1].0,
                shown.display()
            )
        })
        .collect();
    steps.push(format!("`{last}` to `{}` here", cycle[0].0));
    Problem {
        file: last_file.clone(),
        line: Some(closing_line),
        message: format!(
            "segments refer to each other in a cycle: {} ({}); a segment cannot depend on \
             itself, so remove one of these references",
            names.join(" -> "),
            steps.join(", ")
        ),
    }
}

/// Orders segments so that each follows those it refers to. References to segments that are
/// not here, and cycles, were reported already and are skipped.
fn order_by_dependency(segments: Vec<SegmentDef>) -> Vec<SegmentDef> {
    let by_name: BTreeMap<String, SegmentDef> =
        segments.into_iter().map(|s| (s.name.clone(), s)).collect();
    let mut ordered = Vec::new();
    let mut done = BTreeSet::new();
    for name in by_name.keys() {
        let mut path = Vec::new();
        visit(name, &by_name, &mut done, &mut path, &mut ordered);
    }
    ordered
        .into_iter()
        .map(|name| by_name[&name].clone())
        .collect()
}

fn visit(
    name: &str,
    by_name: &BTreeMap<String, SegmentDef>,
    done: &mut BTreeSet<String>,
    path: &mut Vec<String>,
    ordered: &mut Vec<String>,
) {
    if done.contains(name) || path.iter().any(|p| p == name) {
        return;
    }
    let Some(segment) = by_name.get(name) else {
        return;
    };
    path.push(name.to_string());
    for reference in &segment.references {
        visit(reference, by_name, done, path, ordered);
    }
    path.pop();
    if done.insert(name.to_string()) {
        ordered.push(name.to_string());
    }
}
