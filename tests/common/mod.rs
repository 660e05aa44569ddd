//! Shared helpers for the integration tests: a project folder in a temporary directory and
//! the real `segmentd` binary run against it.

#![allow(dead_code)]

pub mod platform;

use std::path::{Path, PathBuf};
use std::process::Output;

/// A throw-away project: config.toml, pipelines/, var/.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// An empty project whose config.toml has one `file` connection called `exports`.
    pub fn new() -> Project {
        let project = Project {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        project.write(
            "config.toml",
            r#"
data_dir = "var"
pipelines_dir = "pipelines"

[duckdb]
memory_limit = "1GB"
threads = 2

[connections.exports]
type = "file"
directory = "var/exports"
format = "csv"
"#,
        );
        project
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Writes a file, creating its folders.
    pub fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn remove(&self, relative: &str) {
        std::fs::remove_file(self.path(relative)).unwrap();
    }

    /// Runs the binary with these arguments in the project folder.
    pub fn segmentd(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_segmentd"))
            .args(args)
            .current_dir(self.dir.path())
            .env("SEGMENTD_LOG", "warn")
            .output()
            .expect("the segmentd binary runs")
    }

    /// Runs `segmentd refresh <pipeline> --json` and returns the summary.
    pub fn refresh(&self, pipeline: &str) -> (bool, serde_json::Value, String) {
        let output = self.segmentd(&["refresh", pipeline, "--json"]);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let summary = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
        (output.status.success(), summary, stderr)
    }

    /// The keys in every export file of an activation whose name has this change (`add` or
    /// `remove`) and run, sorted.
    pub fn exported_keys(&self, activation: &str, run_id: i64, change: &str) -> Vec<String> {
        let folder = self.path("var/exports").join(activation.replace('/', "__"));
        let prefix = format!("run-{run_id:06}-{change}-");
        let mut keys = Vec::new();
        let Ok(entries) = std::fs::read_dir(&folder) else {
            return keys;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) {
                continue;
            }
            let mut reader = csv::Reader::from_path(&path).unwrap();
            for record in reader.records() {
                keys.push(record.unwrap()[0].to_string());
            }
        }
        keys.sort();
        keys
    }

    /// Names of the files in an activation's export folder.
    pub fn export_files(&self, activation: &str) -> Vec<String> {
        let folder = self.path("var/exports").join(activation.replace('/', "__"));
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Copies a folder tree.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A segment's size in a run summary.
pub fn segment_size(summary: &serde_json::Value, segment: &str) -> i64 {
    summary["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .find(|s| s["segment"] == segment)
        .unwrap_or_else(|| panic!("segment {segment} in {summary}"))["size"]
        .as_i64()
        .unwrap()
}

/// An activation's entry in a run summary.
pub fn activation<'a>(summary: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    summary["activations"]
        .as_array()
        .expect("activations")
        .iter()
        .find(|a| a["activation"] == id)
        .unwrap_or_else(|| panic!("activation {id} in {summary}"))
}
