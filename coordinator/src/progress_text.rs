//! The progress texts written to a job (`queue:heartbeat`'s `progress`, the embedded store's
//! `progress`), in the web app's language.
//!
//! The web app is French and translates the old Node worker's texts by keyword (`DESIGN.md`
//! section 2), so the coordinator writes exactly those texts: one per phase and one per analysis
//! step. The CLI's own lines are English, untrusted and vary by build; they stay in the logs.
//! `PROGRESS_LANGUAGE=en` writes English texts of the same shape instead.

use fondation_proto::model::Phase;

/// Steps of an analysis, as the old worker counted them.
pub const TOTAL_STEPS: u32 = 6;

/// The language of the progress texts (`PROGRESS_LANGUAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProgressLanguage {
    /// The web app's language, with the old worker's texts.
    #[default]
    Fr,
    En,
}

/// The old worker's step names, step 1 first.
const STEPS_FR: [&str; TOTAL_STEPS as usize] = [
    "Extraction des abstractions principales",
    "Analyse des relations entre composants",
    "Détermination de l'ordre optimal des chapitres",
    "Génération du contenu des chapitres",
    "Révision et amélioration des chapitres",
    "Génération de tutoriels interactifs",
];

const STEPS_EN: [&str; TOTAL_STEPS as usize] = [
    "Extracting the core abstractions",
    "Analyzing the relationships between components",
    "Deciding the best order of the chapters",
    "Writing the chapters",
    "Reviewing and improving the chapters",
    "Generating interactive tutorials",
];

impl ProgressLanguage {
    /// The text for a run the agent just accepted (status `running`).
    pub fn started(self) -> &'static str {
        match self {
            ProgressLanguage::Fr | ProgressLanguage::En => "Initializing...",
        }
    }

    /// The text for a phase of the run.
    pub fn phase(self, phase: Phase) -> &'static str {
        match (self, phase) {
            (ProgressLanguage::Fr, Phase::Cloning) => "Clonage du dépôt...",
            (ProgressLanguage::Fr, Phase::Analyzing) => "Analyse du code...",
            (ProgressLanguage::Fr, Phase::Gathering) => "Sauvegarde des résultats...",
            (ProgressLanguage::En, Phase::Cloning) => "Cloning the repository...",
            (ProgressLanguage::En, Phase::Analyzing) => "Analyzing the code...",
            (ProgressLanguage::En, Phase::Gathering) => "Saving the results...",
        }
    }

    /// `Étape N/6: <name>` for step `step` (1-based; clamped into 1..=6).
    pub fn step(self, step: u32) -> String {
        let step = step.clamp(1, TOTAL_STEPS);
        let index = (step - 1) as usize;
        match self {
            ProgressLanguage::Fr => format!("Étape {step}/{TOTAL_STEPS}: {}", STEPS_FR[index]),
            ProgressLanguage::En => format!("Step {step}/{TOTAL_STEPS}: {}", STEPS_EN[index]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn french_texts_are_the_old_workers() {
        let fr = ProgressLanguage::Fr;
        assert_eq!(fr.started(), "Initializing...");
        assert_eq!(fr.phase(Phase::Cloning), "Clonage du dépôt...");
        assert_eq!(fr.phase(Phase::Analyzing), "Analyse du code...");
        assert_eq!(fr.phase(Phase::Gathering), "Sauvegarde des résultats...");
        assert_eq!(
            fr.step(1),
            "Étape 1/6: Extraction des abstractions principales"
        );
        assert_eq!(fr.step(6), "Étape 6/6: Génération de tutoriels interactifs");
        assert_eq!(fr.step(9), fr.step(6));
    }

    #[test]
    fn english_texts_have_the_same_shape() {
        let en = ProgressLanguage::En;
        assert_eq!(en.phase(Phase::Cloning), "Cloning the repository...");
        assert_eq!(
            en.step(2),
            "Step 2/6: Analyzing the relationships between components"
        );
    }
}
