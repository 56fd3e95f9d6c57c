//! The analyzer command template (`ANALYZER_COMMAND`): split once like shell words, never handed to
//! a shell; placeholders are replaced inside each argument, so a prompt full of quotes, `;` or
//! `$(...)` stays one inert argument.

use std::fmt;

/// Placeholders a template may use.
const PLACEHOLDERS: [&str; 3] = ["{repo}", "{prompt}", "{job_id}"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("cannot split {template:?} into arguments: {message}")]
    Split { template: String, message: String },
    #[error("the command is empty")]
    Empty,
    #[error(
        "argument {argument:?} has an unknown placeholder; use {{repo}}, {{prompt}} or {{job_id}}"
    )]
    UnknownPlaceholder { argument: String },
    #[error("the command never mentions {{repo}}, so the analyzer would not know what to analyze")]
    NoRepo,
}

#[derive(Clone, PartialEq, Eq)]
pub struct CommandTemplate {
    argv: Vec<String>,
}

impl fmt::Debug for CommandTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.argv).finish()
    }
}

/// Values of the placeholders for one run.
#[derive(Debug, Clone, Copy)]
pub struct TemplateValues<'a> {
    pub repo: &'a str,
    pub prompt: &'a str,
    pub job_id: &'a str,
}

impl CommandTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let argv = shell_words::split(template).map_err(|e| TemplateError::Split {
            template: template.to_string(),
            message: e.to_string(),
        })?;
        if argv.is_empty() {
            return Err(TemplateError::Empty);
        }
        for argument in &argv {
            let mut rest = argument.clone();
            for placeholder in PLACEHOLDERS {
                rest = rest.replace(placeholder, "");
            }
            if rest.contains('{') && rest.contains('}') {
                return Err(TemplateError::UnknownPlaceholder {
                    argument: argument.clone(),
                });
            }
        }
        if !argv.iter().any(|a| a.contains("{repo}")) {
            return Err(TemplateError::NoRepo);
        }
        Ok(Self { argv })
    }

    /// The template's arguments, placeholders unreplaced; the first is the program.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The argv for one run. Values are substituted in one pass per argument, so a value that
    /// itself contains `{repo}` is not expanded again.
    pub fn render(&self, values: TemplateValues<'_>) -> Vec<String> {
        self.argv
            .iter()
            .map(|argument| substitute(argument, values))
            .collect()
    }
}

fn substitute(argument: &str, values: TemplateValues<'_>) -> String {
    let mut out = String::with_capacity(argument.len());
    let mut rest = argument;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let replaced = [
            ("{repo}", values.repo),
            ("{prompt}", values.prompt),
            ("{job_id}", values.job_id),
        ]
        .into_iter()
        .find(|(placeholder, _)| tail.starts_with(placeholder));
        match replaced {
            Some((placeholder, value)) => {
                out.push_str(value);
                rest = &tail[placeholder.len()..];
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUES: TemplateValues<'static> = TemplateValues {
        repo: "/tmp/ws/repo",
        prompt: "explain {repo}; rm -rf / $(whoami) \"quoted\"",
        job_id: "j1",
    };

    #[test]
    fn default_command_splits_and_substitutes() {
        let template = CommandTemplate::parse(crate::config::DEFAULT_ANALYZER_COMMAND).unwrap();
        assert_eq!(
            template.render(VALUES),
            [
                "node",
                "/app/cli/dist/cli.bundled.mjs",
                "analyze",
                "/tmp/ws/repo",
                "--profile",
                "production"
            ]
        );
    }

    #[test]
    fn hostile_prompt_stays_one_inert_argument() {
        let template =
            CommandTemplate::parse("cli analyze {repo} --prompt {prompt} --id=job-{job_id}")
                .unwrap();
        let argv = template.render(VALUES);
        assert_eq!(argv.len(), 6);
        assert_eq!(
            argv[4], VALUES.prompt,
            "the prompt's own {{repo}} is not expanded"
        );
        assert_eq!(argv[5], "--id=job-j1");
    }

    #[test]
    fn quoting_in_the_template_is_honoured() {
        let template = CommandTemplate::parse("'/opt/my cli/run' analyze \"{repo}\"").unwrap();
        assert_eq!(
            template.render(VALUES),
            ["/opt/my cli/run", "analyze", "/tmp/ws/repo"]
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(CommandTemplate::parse("  "), Err(TemplateError::Empty));
        assert!(matches!(
            CommandTemplate::parse("cli 'unclosed {repo}"),
            Err(TemplateError::Split { .. })
        ));
        assert!(matches!(
            CommandTemplate::parse("cli {repo} {branch}"),
            Err(TemplateError::UnknownPlaceholder { .. })
        ));
        assert_eq!(
            CommandTemplate::parse("cli analyze ."),
            Err(TemplateError::NoRepo)
        );
    }
}
