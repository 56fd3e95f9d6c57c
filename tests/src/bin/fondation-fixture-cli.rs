//! Fixture analyzer CLI: see `fondation_testkit::fixture_cli`.

fn main() -> std::process::ExitCode {
    fondation_testkit::fixture_cli::main_from_env()
}
