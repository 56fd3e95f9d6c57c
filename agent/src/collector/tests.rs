use super::*;

const CHAPTER_NAMES: [&str; 11] = [
    "0_workflow_orchestration",
    "1_react-based_terminal_ui",
    "2_claude_sdk_integration",
    "3_schema_validation_framework",
    "4_message_and_chat_system",
    "5_tool_integration_layer",
    "6_content_analysis_framework",
    "7_prompt_template_system",
    "8_chapter_generation_pipeline",
    "9_file_generation_utilities",
    "10_mock_and_testing_infrastructure",
];

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/claude-tutorial-output")
}

fn find<'a>(documents: &'a [CollectedDocument], slug: &str) -> &'a CollectedDocument {
    documents
        .iter()
        .find(|d| d.slug == slug)
        .unwrap_or_else(|| panic!("no document {slug}"))
}

/// A temporary output folder; `files` are (relative path, content) pairs.
fn output_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, content) in files {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }
    dir
}

fn slugs(documents: &[CollectedDocument]) -> Vec<&str> {
    documents.iter().map(|d| d.slug.as_str()).collect()
}

#[test]
fn collects_the_real_sample_in_order() {
    let documents = collect(&sample_dir(), &CollectLimits::default()).expect("collect");
    assert_eq!(documents.len(), 36);

    let mut expected: Vec<String> = STEP_YAML_FILES.iter().map(|f| f.to_string()).collect();
    for (folder, prefix) in [
        ("chapters", "chapter"),
        ("reviewed-chapters", "chapter"),
        ("tutorials", "tutorial"),
    ] {
        for name in CHAPTER_NAMES {
            expected.push(format!("{folder}/{prefix}_{name}.md"));
        }
    }
    assert_eq!(slugs(&documents), expected);

    for (index, document) in documents.iter().enumerate() {
        let expected_kind = match index {
            0..=2 => DocumentKind::Yaml,
            3..=24 => DocumentKind::Chapter,
            _ => DocumentKind::Tutorial,
        };
        assert_eq!(document.kind, expected_kind, "{}", document.slug);
        let expected_index = (index >= 3).then(|| ((index - 3) % 11) as u32);
        assert_eq!(document.chapter_index, expected_index, "{}", document.slug);
    }
}

#[test]
fn sample_yaml_becomes_pretty_json_in_file_order() {
    let documents = collect(&sample_dir(), &CollectLimits::default()).expect("collect");
    for (index, file) in STEP_YAML_FILES.iter().enumerate() {
        let document = &documents[index];
        assert_eq!(document.slug, *file);
        assert_eq!(document.title, STEP_YAML_TITLES[index]);
        assert_eq!(document.chapter_index, None);

        let text = fs::read_to_string(sample_dir().join(file)).expect("read sample");
        let parsed: serde_json::Value = serde_yaml::from_str(&text).expect("sample yaml");
        let stored: serde_json::Value =
            serde_json::from_str(&document.content).expect("content is JSON");
        assert_eq!(stored, parsed, "{file}");
        // Same text as serializing the order-keeping YAML value: keys stay in file order.
        let ordered: serde_yaml::Value = serde_yaml::from_str(&text).expect("sample yaml");
        let pretty = serde_json::to_string_pretty(&ordered).expect("json");
        assert_eq!(document.content, pretty, "{file}");
    }
}

#[test]
fn sample_titles_and_indexes() {
    let documents = collect(&sample_dir(), &CollectLimits::default()).expect("collect");

    let chapter = find(&documents, "chapters/chapter_2_claude_sdk_integration.md");
    assert_eq!(chapter.title, "Chapter 2: Claude SDK Integration");
    assert_eq!(chapter.chapter_index, Some(2));
    let chapter = find(
        &documents,
        "chapters/chapter_10_mock_and_testing_infrastructure.md",
    );
    assert_eq!(chapter.title, "Chapter 10: Mock and Testing Infrastructure");
    assert_eq!(chapter.chapter_index, Some(10));
    let on_disk = fs::read_to_string(
        sample_dir().join("chapters/chapter_10_mock_and_testing_infrastructure.md"),
    )
    .expect("read sample");
    assert_eq!(chapter.content, on_disk);

    let reviewed = find(
        &documents,
        "reviewed-chapters/chapter_10_mock_and_testing_infrastructure.md",
    );
    assert_eq!(
        reviewed.title,
        "Reviewed: Chapter 10: Mock and Testing Infrastructure"
    );
    assert_eq!(reviewed.kind, DocumentKind::Chapter);
    assert_eq!(reviewed.chapter_index, Some(10));

    let tutorial = find(
        &documents,
        "tutorials/tutorial_4_message_and_chat_system.md",
    );
    assert_eq!(
        tutorial.title,
        "Tutorial: Interactive Tutorial: Message and Chat System"
    );
    assert_eq!(tutorial.kind, DocumentKind::Tutorial);
    assert_eq!(tutorial.chapter_index, Some(4));
    // No `# ` line at all: the title comes from the file name.
    let tutorial = find(&documents, "tutorials/tutorial_0_workflow_orchestration.md");
    assert_eq!(
        tutorial.title,
        "Tutorial: tutorial 0 workflow orchestration"
    );
    // Its only `# ` line is a shell comment in a code block (the Node worker titled it "Type
    // checking"): not a title, so the file name gives it.
    let tutorial = find(&documents, "tutorials/tutorial_2_claude_sdk_integration.md");
    assert_eq!(
        tutorial.title,
        "Tutorial: tutorial 2 claude sdk integration"
    );
}

#[test]
fn a_shell_comment_in_a_fence_is_not_a_title() {
    let tutorial = b"Intro text\n\n```bash\n# Type checking\nnpm run typecheck\n```\n\n\
        # Interactive Tutorial: Claude SDK\n\n~~~sh\n# later comment\n~~~\n";
    let dir = output_with(&[("tutorials/tutorial_2_sdk.md", tutorial)]);
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(
        documents[0].title,
        "Tutorial: Interactive Tutorial: Claude SDK"
    );
}

#[test]
fn fences_follow_commonmark() {
    let cases: [(&str, Option<&str>); 8] = [
        ("```\n# in code\n```\n# Title", Some("Title")),
        ("~~~\n# in code\n~~~\n# Title", Some("Title")),
        // A fence closes only with its own character, at least as long as it opened.
        ("````\n```\n# in code\n````\n# Title", Some("Title")),
        ("~~~\n```\n# in code\n~~~\n# Title", Some("Title")),
        // A closing line carries nothing after its run.
        (
            "```\n``` not a close\n# in code\n```\n# Title",
            Some("Title"),
        ),
        // Indented by up to three spaces it is still a fence; by four, it is not.
        ("   ```\n# in code\n   ```\n# Title", Some("Title")),
        ("    ```\n# Title\n", Some("Title")),
        // An unclosed fence runs to the end: no title.
        ("```rust\n# in code\n", None),
    ];
    for (content, title) in cases {
        assert_eq!(markdown_title(content), title, "{content:?}");
    }
}

#[test]
fn yaml_mapping_follows_the_node_worker() {
    let dir = output_with(&[
        ("step3_order.yaml", b"z: 1\na: 2\n"),
        (
            "extra.yml",
            b"base: &b {x: 1}\nderived:\n  <<: *b\n  y: 2\n1: int key\nf: .nan\n",
        ),
        ("another_10.yaml", b"[]"),
        ("another_9.yaml", b"!custom {k: v}"),
        ("step1_abstractions.yaml", b"- one\n"),
    ]);
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(
        slugs(&documents),
        [
            "step1_abstractions.yaml",
            "step3_order.yaml",
            "another_9.yaml",
            "another_10.yaml",
            "extra.yml"
        ]
    );
    assert_eq!(documents[1].title, "Chapter Order");
    assert_eq!(documents[1].content, "{\n  \"z\": 1,\n  \"a\": 2\n}");
    assert_eq!(documents[2].title, "another_9");
    assert_eq!(documents[2].content, "{\n  \"k\": \"v\"\n}");
    assert_eq!(documents[4].title, "extra");
    let extra: serde_json::Value =
        serde_json::from_str(&documents[4].content).expect("content is JSON");
    assert_eq!(
        extra,
        serde_json::json!({
            "base": {"x": 1},
            "derived": {"x": 1, "y": 2},
            "1": "int key",
            "f": null
        })
    );
}

#[test]
fn markdown_title_and_fallback() {
    let dir = output_with(&[
        (
            "chapters/chapter_0_intro.md",
            b"intro\n#NoSpace\n# \n## Sub\n#  Real Title  \r\n# Later\n",
        ),
        (
            "chapters/chapter_1_no_heading.md",
            b"text\n## Only a subheading\n",
        ),
        ("tutorials/notes.md", b""),
    ]);
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(documents[0].title, "Real Title");
    assert_eq!(documents[1].title, "chapter 1 no heading");
    assert_eq!(documents[2].title, "Tutorial: notes");
    assert_eq!(documents[2].kind, DocumentKind::Tutorial);
    assert_eq!(documents[2].chapter_index, Some(0));
}

#[test]
fn long_titles_are_capped() {
    let heading = format!("# {}\n", "é".repeat(400));
    let dir = output_with(&[("chapters/a.md", heading.as_bytes())]);
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(documents[0].title.len(), MAX_NAME_BYTES);
}

#[test]
fn only_markdown_directly_in_known_folders() {
    let dir = output_with(&[
        ("chapters/a.md", b"# A"),
        ("chapters/a.txt", b"not markdown"),
        ("chapters/nested/b.md", b"# nested"),
        ("chapters/dir.md/c.md", b"# in a folder named like a file"),
        ("other/d.md", b"# unknown folder"),
        ("README.md", b"# root markdown"),
        ("nested/e.yaml", b"a: 1"),
    ]);
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(slugs(&documents), ["chapters/a.md"]);
}

#[test]
fn symlinked_files_are_not_read() {
    let dir = output_with(&[("chapters/a.md", b"# A")]);
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("chapters/passwd.md"))
        .expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("step1_abstractions.yaml"))
        .expect("symlink");
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(slugs(&documents), ["chapters/a.md"]);
    assert!(documents.iter().all(|d| !d.content.contains("root:")));
}

#[test]
fn symlinked_folders_are_not_followed() {
    let elsewhere = output_with(&[("secret.md", b"# Secret")]);
    let dir = output_with(&[("chapters/a.md", b"# A")]);
    std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("tutorials")).expect("symlink");
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(slugs(&documents), ["chapters/a.md"]);

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(elsewhere.path(), &link).expect("symlink");
    let error = collect(&link, &CollectLimits::default()).expect_err("a symlinked output");
    assert!(
        matches!(error, CollectError::OutputIsSymlink { .. }),
        "{error}"
    );
}

#[test]
fn oversize_file_is_named() {
    let big = vec![b'x'; 2 * 1024 * 1024];
    let dir = output_with(&[("chapters/a.md", b"# A"), ("chapters/big.md", &big)]);
    let error = collect(dir.path(), &CollectLimits::default()).expect_err("oversize");
    assert!(
        matches!(&error, CollectError::Oversize { path, size: 2_097_152, limit: 1_032_192 } if path == "chapters/big.md"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "output file chapters/big.md is 2097152 bytes, over the 1032192-byte limit for one \
         document; the job cannot be stored"
    );
}

#[test]
fn document_limit_applies_to_stored_content() {
    let limits = CollectLimits {
        max_document_bytes: 20,
        ..CollectLimits::default()
    };
    // 15 bytes of YAML become 40 bytes of pretty JSON.
    let dir = output_with(&[("step2_relationships.yaml", b"a: [1, 2, 3, 4]")]);
    let error = collect(dir.path(), &limits).expect_err("oversize");
    assert!(
        matches!(&error, CollectError::Oversize { path, limit: 20, .. } if path == "step2_relationships.yaml"),
        "{error:?}"
    );

    // 10 invalid bytes become 30 bytes of replacement characters.
    let dir = output_with(&[("chapters/a.md", &[0xff; 10])]);
    let error = collect(dir.path(), &limits).expect_err("oversize");
    assert!(
        matches!(error, CollectError::Oversize { size: 30, .. }),
        "{error:?}"
    );

    // Exactly at the limit is fine.
    let dir = output_with(&[("chapters/a.md", &[b'x'; 20])]);
    collect(dir.path(), &limits).expect("collect");
}

#[test]
fn total_too_large() {
    let limits = CollectLimits {
        max_total_bytes: 100,
        ..CollectLimits::default()
    };
    let chunk = [b'x'; 60];
    let dir = output_with(&[("chapters/a.md", &chunk), ("tutorials/b.md", &chunk)]);
    let error = collect(dir.path(), &limits).expect_err("too large");
    assert!(
        matches!(
            error,
            CollectError::TotalTooLarge {
                total: 120,
                limit: 100
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("120 bytes"), "{error}");
    assert!(error.to_string().contains("100-byte limit"), "{error}");
}

#[test]
fn too_many_files() {
    let limits = CollectLimits {
        max_files: 2,
        ..CollectLimits::default()
    };
    let dir = output_with(&[("chapters/a.md", b"a"), ("chapters/b.md", b"b")]);
    assert_eq!(collect(dir.path(), &limits).expect("collect").len(), 2);
    fs::write(dir.path().join("tutorials.md"), "not counted").expect("write");
    fs::create_dir(dir.path().join("tutorials")).expect("mkdir");
    fs::write(dir.path().join("tutorials/c.md"), "c").expect("write");
    let error = collect(dir.path(), &limits).expect_err("too many");
    assert!(
        matches!(error, CollectError::TooManyFiles { limit: 2, .. }),
        "{error:?}"
    );
}

#[test]
fn invalid_yaml_names_the_file() {
    let dir = output_with(&[("step1_abstractions.yaml", b"key: [unclosed\n")]);
    let error = collect(dir.path(), &CollectLimits::default()).expect_err("invalid");
    assert!(
        matches!(&error, CollectError::InvalidYaml { path, .. } if path == "step1_abstractions.yaml"),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("step1_abstractions.yaml is not valid YAML"),
        "{error}"
    );
}

#[test]
fn missing_or_empty_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join(".claude-tutorial-output");
    let error = collect(&missing, &CollectLimits::default()).expect_err("missing");
    assert!(
        matches!(error, CollectError::MissingOutput { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(".claude-tutorial-output"),
        "{error}"
    );

    let error = collect(dir.path(), &CollectLimits::default()).expect_err("empty");
    assert!(
        matches!(error, CollectError::NoDocuments { .. }),
        "{error:?}"
    );

    for folder in OUTPUT_DIRS {
        fs::create_dir(dir.path().join(folder)).expect("mkdir");
    }
    fs::write(dir.path().join("chapters/notes.txt"), "x").expect("write");
    let error = collect(dir.path(), &CollectLimits::default()).expect_err("no documents");
    assert!(
        matches!(error, CollectError::NoDocuments { .. }),
        "{error:?}"
    );

    let file = dir.path().join("chapters/notes.txt");
    let error = collect(&file, &CollectLimits::default()).expect_err("not a folder");
    assert!(
        matches!(error, CollectError::OutputNotFolder { .. }),
        "{error:?}"
    );
}

#[test]
fn non_utf8_content_is_converted() {
    let dir = output_with(&[("chapters/chapter_0_cafe.md", b"# Caf\xe9\nbody \xff\n")]);
    let documents = collect(dir.path(), &CollectLimits::default()).expect("collect");
    assert_eq!(documents[0].content, "# Caf\u{fffd}\nbody \u{fffd}\n");
    assert_eq!(documents[0].title, "Caf\u{fffd}");
}

#[test]
fn natural_order() {
    let mut names = vec![
        "chapter_10_x.md",
        "chapter_2_x.md",
        "chapter_1_x.md",
        "chapter_02_y.md",
        "chapter_x.md",
        "chapter_100000000000000000000000_x.md",
        "chapter_0_x.md",
        "a",
        "",
    ];
    names.sort_by(|a, b| natural_cmp(a, b));
    assert_eq!(
        names,
        [
            "",
            "a",
            "chapter_0_x.md",
            "chapter_1_x.md",
            "chapter_2_x.md",
            "chapter_02_y.md",
            "chapter_10_x.md",
            "chapter_100000000000000000000000_x.md",
            "chapter_x.md",
        ]
    );
    assert_eq!(natural_cmp("a01", "a1"), Ordering::Less);
    assert_eq!(natural_cmp("a1", "a01"), Ordering::Greater);
    assert_eq!(natural_cmp("a1", "a1"), Ordering::Equal);
    assert_eq!(natural_cmp("é2", "é10"), Ordering::Less);
}

#[test]
fn kinds_have_convex_names() {
    let names = [
        DocumentKind::Chapter,
        DocumentKind::Tutorial,
        DocumentKind::Toc,
        DocumentKind::Yaml,
    ]
    .map(DocumentKind::as_str);
    assert_eq!(names, ["chapter", "tutorial", "toc", "yaml"]);
}

#[test]
fn default_limits() {
    let limits = CollectLimits::default();
    assert_eq!(limits.max_document_bytes, 1_032_192);
    assert_eq!(limits.max_total_bytes, 15 * 1024 * 1024);
    assert_eq!(limits.max_files, 2000);
}
