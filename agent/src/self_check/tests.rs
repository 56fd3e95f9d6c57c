//! The self-check against real folders, files and commands.

use std::os::unix::fs::PermissionsExt;

use super::*;

fn check(root: &Path) -> SelfCheck {
    let workdir = root.join("workdir");
    std::fs::create_dir_all(&workdir).unwrap();
    SelfCheck {
        workspace_root: root.join("temp"),
        min_free_disk: 1,
        workdir,
        analyzer_argv: vec!["sh".into(), "-c".into(), "true".into(), "{repo}".into()],
        analyzer_env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
        slot_user: None,
        check_command: None,
        check_timeout: Duration::from_secs(10),
    }
}

fn executable_file(path: &Path, mode: u32) {
    std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_working_setup_passes() {
    let root = tempfile::tempdir().unwrap();
    check(root.path()).run().await.expect("everything is there");
}

#[tokio::test]
async fn a_missing_workdir_is_named() {
    let root = tempfile::tempdir().unwrap();
    let mut check = check(root.path());
    check.workdir = root.path().join("nowhere");
    let failure = check.run().await.expect_err("no workdir");
    assert!(matches!(failure, CheckFailure::Workdir { .. }), "{failure}");
    assert!(
        failure.to_string().contains("ANALYZER_WORKDIR"),
        "{failure}"
    );
}

#[tokio::test]
async fn too_little_free_disk_is_not_serving() {
    let root = tempfile::tempdir().unwrap();
    let mut check = check(root.path());
    check.min_free_disk = u64::MAX;
    let failure = check.run().await.expect_err("no disk has that much");
    assert!(
        matches!(failure, CheckFailure::DiskFull { .. }),
        "{failure}"
    );
    assert!(failure.to_string().contains("MIN_FREE_DISK"), "{failure}");
}

#[tokio::test]
async fn the_check_command_must_exit_zero_in_time() {
    let root = tempfile::tempdir().unwrap();
    let mut check = check(root.path());
    check.check_command = Some(vec![
        "sh".into(),
        "-c".into(),
        "echo broken >&2; exit 3".into(),
    ]);
    let failure = check.run().await.expect_err("exit 3");
    assert!(failure.to_string().contains("broken"), "{failure}");
    check.check_command = Some(vec!["sleep".into(), "5".into()]);
    check.check_timeout = Duration::from_millis(200);
    let failure = check.run().await.expect_err("too slow");
    assert!(failure.to_string().contains("did not finish"), "{failure}");
    check.check_command = Some(vec!["true".into()]);
    check.run().await.expect("exit 0");
}

#[test]
fn programs_resolve_like_execvp() {
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    executable_file(&bin.join("cli"), 0o755);
    executable_file(&bin.join("not-exec"), 0o644);
    let path_var = format!("/nonexistent:{}", bin.display());
    let workdir = root.path();
    assert_eq!(
        resolve_program("cli", workdir, &path_var, None),
        Ok(bin.join("cli"))
    );
    let missing = resolve_program("nope", workdir, &path_var, None).unwrap_err();
    assert!(missing.contains("not found along PATH"), "{missing}");
    let not_exec = resolve_program("not-exec", workdir, &path_var, None).unwrap_err();
    assert!(not_exec.contains("not executable"), "{not_exec}");
    // A name with a slash is a path from the analyzer's working folder.
    assert_eq!(
        resolve_program("bin/cli", workdir, "", None),
        Ok(workdir.join("bin/cli"))
    );
    assert!(resolve_program("./bin", workdir, "", None)
        .unwrap_err()
        .contains("not a file"));
}

#[test]
fn a_slot_user_needs_the_other_bit_on_a_file_it_does_not_own() {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = root.path().join("cli");
    executable_file(&program, 0o750);
    let stranger = SlotUser {
        uid: 4_000_000,
        gid: 4_000_000,
    };
    let denied =
        resolve_program(program.to_str().unwrap(), root.path(), "", Some(stranger)).unwrap_err();
    assert!(denied.contains("slot user"), "{denied}");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o751)).unwrap();
    resolve_program(program.to_str().unwrap(), root.path(), "", Some(stranger))
        .expect("o+x is enough");
}

#[tokio::test]
async fn a_node_command_needs_its_bundle_and_the_claude_sdk() {
    let root = tempfile::tempdir().unwrap();
    let mut check = check(root.path());
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    executable_file(&bin.join("node"), 0o755);
    check.analyzer_env = vec![("PATH".into(), bin.display().to_string())];
    check.analyzer_argv = ["node", "dist/cli.bundled.mjs", "analyze", "{repo}"]
        .map(String::from)
        .to_vec();
    let failure = check.run().await.expect_err("no bundle");
    assert!(matches!(failure, CheckFailure::Script { .. }), "{failure}");

    std::fs::create_dir_all(check.workdir.join("dist")).unwrap();
    std::fs::write(check.workdir.join("dist/cli.bundled.mjs"), "import 'x';").unwrap();
    let failure = check.run().await.expect_err("no SDK");
    assert!(matches!(failure, CheckFailure::Sdk { .. }), "{failure}");

    // Through NODE_PATH, as in the production image...
    let modules = root.path().join("elsewhere/node_modules");
    std::fs::create_dir_all(modules.join("@anthropic-ai/claude-code")).unwrap();
    check
        .analyzer_env
        .push(("NODE_PATH".into(), modules.display().to_string()));
    check.run().await.expect("the SDK through NODE_PATH");
    // ...or beside the bundle.
    check.analyzer_env.pop();
    std::fs::create_dir_all(check.workdir.join(CLAUDE_SDK)).unwrap();
    check.run().await.expect("the SDK beside the bundle");
}
