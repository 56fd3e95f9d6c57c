//! TEMP STUB
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ValidationError(String);
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoAllowlist(Vec<String>);
impl RepoAllowlist {
    pub const DEFAULT: &'static str = "https://github.com/";
    pub fn parse(csv: &str) -> Result<Self, ValidationError> {
        Ok(Self(csv.split(',').map(String::from).collect()))
    }
    pub fn check(&self, url: &str) -> Result<(), ValidationError> {
        if self.0.iter().any(|p| url.starts_with(p)) {
            Ok(())
        } else {
            Err(ValidationError(url.into()))
        }
    }
    pub fn git_protocols(&self) -> String {
        "https:file".into()
    }
}
pub fn check_branch(_name: &str) -> Result<(), ValidationError> {
    Ok(())
}
pub fn check_job_id(_id: &str) -> Result<(), ValidationError> {
    Ok(())
}
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;
pub fn check_prompt(_p: &str) -> Result<(), ValidationError> {
    Ok(())
}
