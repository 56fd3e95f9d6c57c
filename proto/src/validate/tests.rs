use super::*;

fn allow(csv: &str) -> RepoAllowlist {
    RepoAllowlist::parse(csv).expect("allow-list should parse")
}

#[test]
fn default_allowlist_admits_github_https() {
    let list = RepoAllowlist::default();
    assert_eq!(list, allow(RepoAllowlist::DEFAULT));
    list.check("https://github.com/owner/repo.git").unwrap();
    list.check("https://github.com/owner/repo").unwrap();
    // Normalization: case of scheme and host, default port, dot segments.
    list.check("HTTPS://GitHub.com:443/owner/repo.git").unwrap();
    assert_eq!(
        list.normalize("HTTPS://GitHub.com:443/owner/./repo.git")
            .unwrap(),
        "https://github.com/owner/repo.git"
    );
}

#[test]
fn default_allowlist_refuses_other_hosts_and_schemes() {
    let list = RepoAllowlist::default();
    for url in [
        "https://evil.example/x.git",
        "https://github.com.evil.io/x",
        "http://github.com/owner/repo.git",
        "ssh://github.com/owner/repo.git",
        "git://github.com/owner/repo.git",
        "file:///etc/passwd",
    ] {
        assert!(
            matches!(list.check(url), Err(ValidationError::UrlNotAllowed { .. })),
            "{url} should not be allowed"
        );
    }
}

#[test]
fn not_allowed_message_names_url_and_list() {
    let err = RepoAllowlist::default()
        .check("https://evil.example/x.git")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "repository URL \"https://evil.example/x.git\" is not allowed: it matches none of \
         REPO_ALLOWLIST (https://github.com/)"
    );
}

#[test]
fn prefix_without_trailing_slash_matches_on_boundary_only() {
    // A host-only prefix is normalized with its '/' anyway.
    let list = allow("https://github.com");
    assert_eq!(list.prefixes(), ["https://github.com/"]);
    list.check("https://github.com/a/b").unwrap();
    assert!(list.check("https://github.com.evil.io/x").is_err());

    let list = allow("https://github.com/org");
    list.check("https://github.com/org/repo.git").unwrap();
    list.check("https://github.com/org").unwrap();
    assert!(list.check("https://github.com/org-evil/repo.git").is_err());
    assert!(list.check("https://github.com/organization/repo").is_err());
    // Dot segments are resolved before comparing, so they cannot climb out of the prefix.
    assert!(list.check("https://github.com/org/../other/repo").is_err());
    assert!(list
        .check("https://github.com/org/%2e%2e/other/repo")
        .is_err());
}

#[test]
fn parse_trims_ignores_empty_entries_and_deduplicates() {
    let list = allow(" https://github.com/ , ,https://gitlab.com/group/,https://github.com/,");
    assert_eq!(
        list.prefixes(),
        ["https://github.com/", "https://gitlab.com/group/"]
    );
    assert_eq!(
        list.to_string(),
        "https://github.com/,https://gitlab.com/group/"
    );
    list.check("https://gitlab.com/group/p.git").unwrap();
    assert!(list.check("https://gitlab.com/other/p.git").is_err());
}

#[test]
fn parse_refuses_empty_list() {
    for csv in ["", "  ", ",", " , ,"] {
        assert_eq!(
            RepoAllowlist::parse(csv),
            Err(ValidationError::EmptyAllowlist)
        );
    }
}

#[test]
fn parse_names_the_bad_entry() {
    for bad in [
        "ext::sh",
        "fd::17",
        "ftp://h/",
        "github.com",
        "https://u:p@h/",
        "https://h/?x",
    ] {
        let err = RepoAllowlist::parse(&format!("https://github.com/,{bad}")).unwrap_err();
        // An entry with a credential is named with the credential redacted.
        let shown = redact_credentials(bad);
        match &err {
            ValidationError::InvalidAllowlistEntry { entry, .. } => assert_eq!(*entry, shown),
            other => panic!("{bad}: unexpected {other:?}"),
        }
        assert!(err.to_string().contains(shown.as_ref()), "{err}");
        assert!(!err.to_string().contains("u:p@"), "{err}");
    }
}

#[test]
fn git_protocols_lists_prefix_schemes_once() {
    assert_eq!(RepoAllowlist::default().git_protocols(), "https");
    let list = allow("https://github.com/,file:///srv/git/,https://gitlab.com/,ssh://h/");
    assert_eq!(list.git_protocols(), "https:file:ssh");
}

#[test]
fn file_urls_need_a_file_prefix() {
    assert!(RepoAllowlist::default()
        .check("file:///srv/git/repo.git")
        .is_err());
    let list = allow("https://github.com/,file:///srv/git");
    list.check("file:///srv/git/repo.git").unwrap();
    assert!(list.check("file:///srv/gitx/repo.git").is_err());
    assert!(list.check("file:///etc/passwd").is_err());
}

#[test]
fn malformed_or_dangerous_urls_are_invalid() {
    let list = allow("https://github.com/,ssh://github.com/,file:///");
    for url in [
        "",
        "not a url",
        "github.com/owner/repo",
        "git@github.com:owner/repo.git",
        "ext::sh -c touch% /tmp/pwned",
        "ext::sh",
        "fd::17",
        "ftp://github.com/x",
        "-https://github.com/x",
        "--upload-pack=touch",
        " https://github.com/owner/repo",
        "https://github.com/owner/repo\n",
        "https://github.com/own\ter/repo",
        "https://github.com/owner/re po",
        "https://user:secret@github.com/owner/repo.git",
        "https://token@github.com/owner/repo.git",
        "https://github.com/owner/repo.git?x=1",
        "https://github.com/owner/repo.git#frag",
        "https://github.com\\@evil.io/x",
        "https://github.com/",
        "ssh://-oProxyCommand=touch/x",
        "file:///",
    ] {
        assert!(
            matches!(list.check(url), Err(ValidationError::InvalidUrl { .. })),
            "{url:?} should be invalid, got {:?}",
            list.check(url)
        );
    }
    let long = format!("https://github.com/{}", "a".repeat(MAX_URL_BYTES));
    assert!(matches!(
        list.check(&long),
        Err(ValidationError::InvalidUrl { .. })
    ));
}

#[test]
fn invalid_url_message_is_bounded_and_escaped() {
    let junk = format!("https://github.com/\n{}", "x".repeat(10_000));
    let msg = RepoAllowlist::default()
        .check(&junk)
        .unwrap_err()
        .to_string();
    assert!(msg.len() < 600, "message too long: {}", msg.len());
    assert!(
        !msg.contains('\n'),
        "control characters must be escaped: {msg}"
    );
    assert!(msg.contains("\\n"));
}

#[test]
fn credentials_error_says_why() {
    let msg = RepoAllowlist::default()
        .check("https://u:p@github.com/o/r.git")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("credentials must not travel in job data"),
        "{msg}"
    );
}

#[test]
fn valid_branches() {
    for name in [
        "main",
        "master",
        "feature/x",
        "release-1.2",
        "v1.2.3",
        "user/fix_bug-42",
        "a.b",
        "x.locked",
        "@foo",
        "a@b",
        "caf\u{e9}",
        "\u{65e5}\u{672c}",
    ] {
        assert_eq!(check_branch(name), Ok(()), "{name:?} should be valid");
    }
    check_branch(&"a".repeat(MAX_BRANCH_BYTES)).unwrap();
}

#[test]
fn invalid_branches() {
    for name in [
        "",
        "--upload-pack=x",
        "--upload-pack=touch /tmp/pwned",
        "-x",
        "main;rm -rf /",
        "a..b",
        "x.lock",
        "a/x.lock/b",
        "@",
        "HEAD",
        "a@{1}",
        "/main",
        "main/",
        "a//b",
        ".hidden",
        "a/.b",
        "main.",
        "a b",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[b",
        "a\\b",
        "a\tb",
        "a\nb",
        "a\u{7f}",
        "a|b",
        "a&b",
        "$HOME",
        "`id`",
        "a'b",
        "a\"b",
        "a<b",
        "a>b",
    ] {
        assert!(
            matches!(
                check_branch(name),
                Err(ValidationError::InvalidBranch { .. })
            ),
            "{name:?} should be invalid"
        );
    }
    assert!(check_branch(&"a".repeat(MAX_BRANCH_BYTES + 1)).is_err());
}

#[test]
fn branch_error_names_input_and_reason() {
    let msg = check_branch("main;rm -rf /").unwrap_err().to_string();
    assert!(
        msg.starts_with("branch name \"main;rm -rf /\" is not valid: "),
        "{msg}"
    );
    let msg = check_branch("--upload-pack=x").unwrap_err().to_string();
    assert!(msg.contains("starts with '-'"), "{msg}");
}

#[test]
fn a_job_branch_may_be_empty_for_the_default_branch_and_is_checked_otherwise() {
    assert_eq!(check_job_branch(""), Ok(()));
    assert_eq!(check_job_branch("release/1.2"), Ok(()));
    assert_eq!(
        check_job_branch("--upload-pack=x"),
        check_branch("--upload-pack=x")
    );
    assert!(
        check_job_branch(" ").is_err(),
        "only the empty name means default"
    );
}

#[test]
fn job_ids() {
    for id in [
        "a",
        "j57c2x9w1kq4m8v3n6b0r5t7y2h1d9f",
        "job_1-2",
        &"x".repeat(64),
    ] {
        assert_eq!(check_job_id(id), Ok(()), "{id:?}");
    }
    for id in ["", "a/b", "../x", "a b", "a.b", "é", &"x".repeat(65)] {
        assert!(
            matches!(check_job_id(id), Err(ValidationError::InvalidJobId { .. })),
            "{id:?} should be invalid"
        );
    }
    let msg = check_job_id("a/b").unwrap_err().to_string();
    assert!(msg.contains("\"a/b\"") && msg.contains("'/'"), "{msg}");
}

#[test]
fn agent_ids() {
    for id in ["a", "agent-1", "host_2", &"x".repeat(64)] {
        assert_eq!(check_agent_id(id), Ok(()), "{id:?}");
    }
    for id in ["", "a/b", "..", "a b", "é", &"x".repeat(65)] {
        assert!(
            matches!(
                check_agent_id(id),
                Err(ValidationError::InvalidAgentId { .. })
            ),
            "{id:?} should be invalid"
        );
    }
    let msg = check_agent_id("a b").unwrap_err().to_string();
    assert!(msg.starts_with("agent id \"a b\""), "{msg}");
}

#[test]
fn prompts() {
    check_prompt("").unwrap();
    check_prompt("analyze this repository, please").unwrap();
    check_prompt(&"p".repeat(MAX_PROMPT_BYTES)).unwrap();
    assert_eq!(
        check_prompt(&"p".repeat(MAX_PROMPT_BYTES + 1)),
        Err(ValidationError::PromptTooLarge {
            len: MAX_PROMPT_BYTES + 1,
            max: MAX_PROMPT_BYTES
        })
    );
    assert_eq!(
        check_prompt("ab\0c"),
        Err(ValidationError::PromptContainsNul { offset: 2 })
    );
}

#[test]
fn shown_truncates_on_char_boundary() {
    assert_eq!(shown("abc"), "abc");
    let long = "\u{e9}".repeat(SHOWN_CHARS + 5);
    let s = shown(&long);
    assert!(s.ends_with("..."));
    assert_eq!(s.chars().count(), SHOWN_CHARS + 3);
}

#[test]
fn credentials_are_redacted_everywhere_in_a_text() {
    for (text, redacted) in [
        ("https://user:pass@host/x", "https://***@host/x"),
        ("https://token@github.com", "https://***@github.com"),
        (
            "clone of https://a:b@h/r.git failed, see ssh://git:pw@h2:22/r",
            "clone of https://***@h/r.git failed, see ssh://***@h2:22/r",
        ),
        ("https://u:p@x@h/?q#f", "https://***@h/?q#f"),
        ("https://github.com/o/r.git", "https://github.com/o/r.git"),
        ("mail me at a@b.c", "mail me at a@b.c"),
        ("https://h/path@not-user", "https://h/path@not-user"),
    ] {
        assert_eq!(redact_credentials(text), redacted, "{text}");
    }
}

#[test]
fn refusing_a_credentialed_url_does_not_repeat_it() {
    let allowlist = RepoAllowlist::default();
    for url in [
        "https://user:s3cret@github.com/o/r.git",
        "https://s3cret@evil.io/o/r.git",
    ] {
        let message = allowlist.check(url).unwrap_err().to_string();
        assert!(!message.contains("s3cret"), "{message}");
        assert!(message.contains("***@"), "{message}");
    }
}
