//! TEMP STUB
use std::path::Path;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    Chapter,
    Tutorial,
    Toc,
    Yaml,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedDocument {
    pub slug: String,
    pub title: String,
    pub kind: DocKind,
    pub chapter_index: Option<u32>,
    pub content: String,
}
#[derive(Debug, Clone, Default)]
pub struct CollectLimits {
    pub max_document_bytes: u64,
    pub max_total_bytes: u64,
    pub max_files: usize,
}
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct CollectError;
impl CollectError {
    pub fn is_permanent(&self) -> bool {
        true
    }
}
pub fn collect(_d: &Path, _l: &CollectLimits) -> Result<Vec<CollectedDocument>, CollectError> {
    Err(CollectError)
}
