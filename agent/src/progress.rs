//! TEMP STUB
pub const TOTAL_STEPS: u32 = 6;
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    pub step: Option<u32>,
    pub message: String,
}
pub fn parse_line(_line: &str) -> Option<StepReport> {
    None
}
pub fn is_error_line(_line: &str) -> bool {
    false
}
pub fn last_step_with_output(_d: &std::path::Path) -> Option<u32> {
    None
}
