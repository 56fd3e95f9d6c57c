//! Turning the analyzer's output folder into the documents stored in Convex.
//!
//! The CLI writes `step1_abstractions.yaml`, `step2_relationships.yaml`, `step3_order.yaml`,
//! `chapters/*.md`, `reviewed-chapters/*.md` and `tutorials/*.md` (DESIGN.md section 3). This
//! module maps them to documents the way the Node worker it replaces did, except that files are
//! ordered naturally (`chapter_2` before `chapter_10`). The folder is written by a program
//! working on an untrusted repository, so collection follows no symlinks, reads only regular
//! files, and caps every size before reading (DESIGN.md section 5): an oversize result fails with
//! an error naming the file, it is never truncated.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fs::{self, Metadata};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fondation_proto::limits::{truncate_utf8, MAX_NAME_BYTES};
use fondation_proto::model::DocumentKind;
use serde::ser::{Serialize, SerializeMap, Serializer};
use tracing::warn;

/// The YAML files of steps 1 to 3, in step order.
pub const STEP_YAML_FILES: [&str; 3] = [
    "step1_abstractions.yaml",
    "step2_relationships.yaml",
    "step3_order.yaml",
];

/// The titles of [`STEP_YAML_FILES`], as the Node worker stored them.
const STEP_YAML_TITLES: [&str; 3] = ["Abstractions", "Relationships", "Chapter Order"];

/// The markdown folders of steps 4 to 6, in step order.
pub const OUTPUT_DIRS: [&str; 3] = ["chapters", "reviewed-chapters", "tutorials"];

/// Kind and title prefix of the documents of each of [`OUTPUT_DIRS`].
const OUTPUT_DIR_KINDS: [(DocumentKind, &str); 3] = [
    (DocumentKind::Chapter, ""),
    (DocumentKind::Chapter, "Reviewed: "),
    (DocumentKind::Tutorial, "Tutorial: "),
];

/// One document read from the output folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedDocument {
    /// Path relative to the output folder, e.g. `chapters/chapter_0_intro.md`.
    pub slug: String,
    pub title: String,
    pub kind: DocumentKind,
    /// 0-based position within its folder, in natural order; None for YAML documents.
    pub chapter_index: Option<u32>,
    pub content: String,
}

/// Size bounds of one job's documents, set by what Convex accepts.
#[derive(Debug, Clone)]
pub struct CollectLimits {
    /// Largest content of one document, in bytes.
    pub max_document_bytes: u64,
    /// Largest sum of the contents of all documents, in bytes.
    pub max_total_bytes: u64,
    /// Most files collected from one output folder.
    pub max_files: usize,
}

impl Default for CollectLimits {
    fn default() -> Self {
        // The same limits the coordinator enforces on a result (Convex's document and call sizes).
        Self {
            max_document_bytes: fondation_proto::limits::MAX_DOCUMENT_BYTES,
            max_total_bytes: fondation_proto::limits::MAX_RESULT_BYTES,
            max_files: fondation_proto::limits::MAX_DOCUMENTS,
        }
    }
}

pub type Result<T, E = CollectError> = std::result::Result<T, E>;

/// Why an output folder could not be turned into documents.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(
        "the analyzer produced no output folder at {}: it exited successfully without writing \
         results; check its output-dir setting and its log",
        path.display()
    )]
    MissingOutput { path: PathBuf },

    #[error(
        "the analyzer output folder {} is a symlink; it is not followed, so the job's output \
         cannot be collected",
        path.display()
    )]
    OutputIsSymlink { path: PathBuf },

    #[error(
        "the analyzer output path {} is not a folder; check the analyzer's output-dir setting",
        path.display()
    )]
    OutputNotFolder { path: PathBuf },

    #[error(
        "the analyzer wrote no documents in {}: it exited successfully but none of the expected \
         files (step*.yaml, chapters/*.md, reviewed-chapters/*.md, tutorials/*.md) is there",
        path.display()
    )]
    NoDocuments { path: PathBuf },

    #[error(
        "the analyzer output folder {} holds more than {limit} files; the job cannot be stored",
        path.display()
    )]
    TooManyFiles { path: PathBuf, limit: usize },

    /// `path` is the document's slug (its path relative to the output folder).
    #[error(
        "output file {path} is {size} bytes, over the {limit}-byte limit for one document; \
         the job cannot be stored"
    )]
    Oversize { path: String, size: u64, limit: u64 },

    #[error(
        "the analyzer output adds up to {total} bytes, over the {limit}-byte limit for one job's \
         documents; the job cannot be stored"
    )]
    TotalTooLarge { total: u64, limit: u64 },

    /// `path` is the file's slug.
    #[error(
        "output file {path} is not valid YAML ({source}); the analyzer wrote a corrupt result"
    )]
    InvalidYaml {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },

    /// `path` is the file's slug.
    #[error("output file {path} could not be written as JSON ({source})")]
    YamlToJson {
        path: String,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "output file {} was replaced while it was being collected (no longer the regular file \
         that was listed); it was not read",
        path.display()
    )]
    Changed { path: PathBuf },

    #[error(
        "could not read analyzer output {} ({source}); check that the agent can read its work \
         folder",
        path.display()
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CollectError {
    /// Whether running the analyzer again cannot help: output over the size limits stays over
    /// them, and a symlinked output folder is a misbehaving CLI. Other problems (missing or
    /// malformed output) may not recur on a second run of a non-deterministic analyzer.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CollectError::Oversize { .. }
                | CollectError::TotalTooLarge { .. }
                | CollectError::TooManyFiles { .. }
                | CollectError::OutputIsSymlink { .. }
        )
    }
}

/// Reads every document of the analyzer's output folder, in the order they are stored: the YAML
/// files (steps 1, 2, 3, then any other), then chapters, reviewed chapters and tutorials, each in
/// natural order of file names.
pub fn collect(output_dir: &Path, limits: &CollectLimits) -> Result<Vec<CollectedDocument>> {
    check_output_dir(output_dir)?;
    let mut lister = Lister {
        root: output_dir,
        limits,
        listed: 0,
    };

    // List everything first, so that too many files or an oversize one fail before any reading.
    let mut yaml_files = lister.list(output_dir, "", is_yaml_name)?;
    yaml_files.sort_by(|a, b| {
        let rank = |c: &Candidate| known_yaml_index(&c.name).unwrap_or(STEP_YAML_FILES.len());
        rank(a)
            .cmp(&rank(b))
            .then_with(|| natural_cmp(&a.name, &b.name))
    });
    let mut folders = Vec::with_capacity(OUTPUT_DIRS.len());
    for folder in OUTPUT_DIRS {
        let dir = output_dir.join(folder);
        let files = if is_collectable_folder(&dir, folder)? {
            lister.list(&dir, folder, |name| name.ends_with(".md"))?
        } else {
            Vec::new()
        };
        folders.push(files);
    }
    if yaml_files.is_empty() && folders.iter().all(Vec::is_empty) {
        return Err(CollectError::NoDocuments {
            path: output_dir.to_owned(),
        });
    }

    let mut documents = Vec::new();
    for file in &yaml_files {
        documents.push(yaml_document(file, limits)?);
    }

    // Markdown is stored as read, so its size on disk is its size as a document (more only if
    // it is not UTF-8): refuse an output that is too large before reading it into memory.
    let yaml_bytes: u64 = documents.iter().map(|d| d.content.len() as u64).sum();
    let markdown_bytes: u64 = folders.iter().flatten().map(|c| c.metadata.len()).sum();
    check_total(yaml_bytes.saturating_add(markdown_bytes), limits)?;

    for (files, (kind, title_prefix)) in folders.iter().zip(OUTPUT_DIR_KINDS) {
        for (index, file) in files.iter().enumerate() {
            let content = read_text(file, limits)?;
            let stem = file.name.strip_suffix(".md").unwrap_or(&file.name);
            let title = match markdown_title(&content) {
                Some(title) => format!("{title_prefix}{title}"),
                None => format!("{title_prefix}{}", stem.replace('_', " ")),
            };
            documents.push(CollectedDocument {
                slug: file.slug.clone(),
                // A title comes from a line of the file: a runaway line must not eat the room the
                // other fields of a Convex document need.
                title: truncate_utf8(&title, MAX_NAME_BYTES).to_owned(),
                kind,
                chapter_index: Some(u32::try_from(index).unwrap_or(u32::MAX)),
                content,
            });
        }
    }
    check_total(
        documents.iter().map(|d| d.content.len() as u64).sum(),
        limits,
    )?;
    Ok(documents)
}

/// Compares names so that digit runs compare as numbers: `chapter_2_x` < `chapter_10_x`.
/// Names equal but for leading zeros (`a01`, `a1`) fall back to plain order, so the order is
/// total and sorting is deterministic.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a, b);
    loop {
        match (x.chars().next(), y.chars().next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let (x_digits, x_rest) = split_digits(x);
                let (y_digits, y_rest) = split_digits(y);
                // Compare by value without parsing, so any length of digits works.
                let x_value = x_digits.trim_start_matches('0');
                let y_value = y_digits.trim_start_matches('0');
                let order = x_value
                    .len()
                    .cmp(&y_value.len())
                    .then_with(|| x_value.cmp(y_value));
                if order != Ordering::Equal {
                    return order;
                }
                (x, y) = (x_rest, y_rest);
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(&d);
                }
                (x, y) = (&x[c.len_utf8()..], &y[d.len_utf8()..]);
            }
        }
    }
}

fn split_digits(text: &str) -> (&str, &str) {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    text.split_at(digits)
}

/// A regular file listed for collection.
struct Candidate {
    /// File name within its folder.
    name: String,
    slug: String,
    path: PathBuf,
    /// From `symlink_metadata` at listing time; reading checks it is still the same file.
    metadata: Metadata,
}

/// Lists candidate files, counting them across folders against the file limit.
struct Lister<'a> {
    root: &'a Path,
    limits: &'a CollectLimits,
    listed: usize,
}

impl Lister<'_> {
    /// The regular files directly in `dir` whose name is `wanted`, in natural order. `folder` is
    /// the slug prefix ("" for the output folder itself).
    fn list(
        &mut self,
        dir: &Path,
        folder: &str,
        wanted: fn(&str) -> bool,
    ) -> Result<Vec<Candidate>> {
        let io_error = |source| CollectError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                if wanted(&file_name.to_string_lossy()) {
                    warn!(path = %entry.path().display(), "skipping output file whose name is not UTF-8");
                }
                continue;
            };
            if !wanted(name) {
                continue;
            }
            let slug = if folder.is_empty() {
                name.to_owned()
            } else {
                format!("{folder}/{name}")
            };
            let path = entry.path();
            let metadata = fs::symlink_metadata(&path).map_err(|source| CollectError::Io {
                path: path.clone(),
                source,
            })?;
            if metadata.file_type().is_symlink() {
                warn!(file = %slug, "skipping symlink in analyzer output; symlinks are not followed");
                continue;
            }
            if !metadata.file_type().is_file() {
                warn!(file = %slug, "skipping analyzer output entry that is not a regular file");
                continue;
            }
            self.listed += 1;
            if self.listed > self.limits.max_files {
                return Err(CollectError::TooManyFiles {
                    path: self.root.to_owned(),
                    limit: self.limits.max_files,
                });
            }
            check_document_size(&slug, metadata.len(), self.limits)?;
            files.push(Candidate {
                name: name.to_owned(),
                slug,
                path,
                metadata,
            });
        }
        files.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        Ok(files)
    }
}

fn check_output_dir(path: &Path) -> Result<()> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CollectError::MissingOutput {
                path: path.to_owned(),
            })
        }
        Err(source) => {
            return Err(CollectError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if metadata.file_type().is_symlink() {
        return Err(CollectError::OutputIsSymlink {
            path: path.to_owned(),
        });
    }
    if !metadata.file_type().is_dir() {
        return Err(CollectError::OutputNotFolder {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Whether `dir` is a real folder to list; a missing one is simply an absent step, a symlink or
/// anything else is skipped with a warning.
fn is_collectable_folder(dir: &Path, folder: &str) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Ok(metadata) if metadata.file_type().is_dir() => Ok(true),
        Ok(metadata) if metadata.file_type().is_symlink() => {
            warn!(
                folder,
                "skipping symlinked folder in analyzer output; symlinks are not followed"
            );
            Ok(false)
        }
        Ok(_) => {
            warn!(
                folder,
                "skipping analyzer output entry that should be a folder but is not"
            );
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CollectError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}

fn is_yaml_name(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml")
}

fn known_yaml_index(name: &str) -> Option<usize> {
    STEP_YAML_FILES.iter().position(|known| *known == name)
}

fn yaml_document(file: &Candidate, limits: &CollectLimits) -> Result<CollectedDocument> {
    let text = read_text(file, limits)?;
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|source| CollectError::InvalidYaml {
            path: file.slug.clone(),
            source,
        })?;
    // The Node worker's js-yaml resolved `<<` merge keys; serde_yaml only does it on request.
    value
        .apply_merge()
        .map_err(|source| CollectError::InvalidYaml {
            path: file.slug.clone(),
            source,
        })?;
    let content = serde_json::to_string_pretty(&AsJson(&value)).map_err(|source| {
        CollectError::YamlToJson {
            path: file.slug.clone(),
            source,
        }
    })?;
    // Pretty JSON is often larger than the YAML it came from.
    check_document_size(&file.slug, content.len() as u64, limits)?;
    let title = match known_yaml_index(&file.name) {
        Some(index) => STEP_YAML_TITLES[index].to_owned(),
        None => Path::new(&file.name)
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.name.clone()),
    };
    Ok(CollectedDocument {
        slug: file.slug.clone(),
        title,
        kind: DocumentKind::Yaml,
        chapter_index: None,
        content,
    })
}

/// The first `# ` heading outside fenced code blocks (DESIGN.md section 3): a `# ` line inside a
/// ```` ``` ```` or `~~~` fence is a shell or Python comment, not a title. As in CommonMark, a
/// fence is opened by three or more backticks or tildes indented by at most three spaces, closed
/// by a line of at least as many of the same character and nothing else, and an unclosed fence
/// runs to the end of the file.
fn markdown_title(content: &str) -> Option<&str> {
    let mut open_fence: Option<(u8, usize)> = None;
    for line in content.lines() {
        if let Some((marker, length, rest)) = fence_line(line) {
            match open_fence {
                None => open_fence = Some((marker, length)),
                Some((open, open_length))
                    if marker == open && length >= open_length && rest.trim().is_empty() =>
                {
                    open_fence = None;
                }
                Some(_) => {}
            }
            continue;
        }
        if open_fence.is_some() {
            continue;
        }
        if let Some(title) = line.strip_prefix("# ").map(str::trim) {
            if !title.is_empty() {
                return Some(title);
            }
        }
    }
    None
}

/// A fence line: its character, how many of them, and what follows them.
fn fence_line(line: &str) -> Option<(u8, usize, &str)> {
    let text = line.trim_start_matches(' ');
    if line.len() - text.len() > 3 {
        return None;
    }
    let marker = *text
        .as_bytes()
        .first()
        .filter(|b| matches!(b, b'`' | b'~'))?;
    let length = text.bytes().take_while(|&b| b == marker).count();
    // The run is ASCII, so `length` is a character boundary.
    (length >= 3).then(|| (marker, length, &text[length..]))
}

/// Reads a listed file as text, refusing to follow a symlink swapped in since listing and never
/// reading more than one document's limit.
fn read_text(file: &Candidate, limits: &CollectLimits) -> Result<String> {
    let io_error = |source| CollectError::Io {
        path: file.path.clone(),
        source,
    };
    let mut handle = fs::OpenOptions::new()
        .read(true)
        // No following a symlink, and no blocking forever on a FIFO swapped in after listing.
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&file.path)
        .map_err(io_error)?;
    let opened = handle.metadata().map_err(io_error)?;
    // A parent folder swapped for a symlink would lead elsewhere: check it is the listed file.
    if !opened.file_type().is_file()
        || opened.dev() != file.metadata.dev()
        || opened.ino() != file.metadata.ino()
    {
        return Err(CollectError::Changed {
            path: file.path.clone(),
        });
    }
    let limit = limits.max_document_bytes;
    let capacity = opened.len().min(limit.saturating_add(1));
    let mut bytes = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    // The file may have grown since its size was checked: read one byte past the limit at most.
    (&mut handle)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    let read = bytes.len() as u64;
    if read > limit {
        return Err(CollectError::Oversize {
            path: file.slug.clone(),
            size: read.max(opened.len()),
            limit,
        });
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(not_utf8) => {
            warn!(file = %file.slug, "analyzer output is not valid UTF-8; invalid bytes replaced");
            String::from_utf8_lossy(not_utf8.as_bytes()).into_owned()
        }
    };
    // Replacement characters are longer than the bytes they replace.
    check_document_size(&file.slug, text.len() as u64, limits)?;
    Ok(text)
}

fn check_document_size(slug: &str, size: u64, limits: &CollectLimits) -> Result<()> {
    if size > limits.max_document_bytes {
        return Err(CollectError::Oversize {
            path: slug.to_owned(),
            size,
            limit: limits.max_document_bytes,
        });
    }
    Ok(())
}

fn check_total(total: u64, limits: &CollectLimits) -> Result<()> {
    if total > limits.max_total_bytes {
        return Err(CollectError::TotalTooLarge {
            total,
            limit: limits.max_total_bytes,
        });
    }
    Ok(())
}

/// Serializes a YAML value as JSON the way `JSON.stringify` did in the Node worker: mapping
/// order kept (a `serde_json::Value` would sort keys), non-string keys written as strings, tags
/// dropped, non-finite numbers as null.
struct AsJson<'a>(&'a serde_yaml::Value);

impl Serialize for AsJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde_yaml::Value;
        match self.0 {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    serializer.serialize_i64(i)
                } else if let Some(u) = n.as_u64() {
                    serializer.serialize_u64(u)
                } else {
                    match n.as_f64() {
                        Some(f) if f.is_finite() => serializer.serialize_f64(f),
                        _ => serializer.serialize_unit(),
                    }
                }
            }
            Value::String(s) => serializer.serialize_str(s),
            Value::Sequence(items) => serializer.collect_seq(items.iter().map(AsJson)),
            Value::Mapping(mapping) => {
                let mut map = serializer.serialize_map(Some(mapping.len()))?;
                for (key, value) in mapping {
                    map.serialize_entry(&json_key(key), &AsJson(value))?;
                }
                map.end()
            }
            Value::Tagged(tagged) => AsJson(&tagged.value).serialize(serializer),
        }
    }
}

fn json_key(key: &serde_yaml::Value) -> Cow<'_, str> {
    use serde_yaml::Value;
    match key {
        Value::String(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed("null"),
        Value::Bool(b) => Cow::Owned(b.to_string()),
        Value::Number(n) => Cow::Owned(n.to_string()),
        Value::Tagged(tagged) => json_key(&tagged.value),
        Value::Sequence(_) | Value::Mapping(_) => {
            Cow::Owned(serde_json::to_string(&AsJson(key)).unwrap_or_default())
        }
    }
}

#[cfg(test)]
mod tests;
