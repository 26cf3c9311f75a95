//! Evaluation of the global burn model on the test set.

use fedcompress_model::{Backend, Dataset, ModelKind, evaluate};

use crate::engine::{Evaluation, Evaluator};

pub struct TestSetEvaluator {
    pub kind: ModelKind,
    pub backend: Backend,
    pub test: Dataset,
}

impl Evaluator for TestSetEvaluator {
    fn evaluate(&self, params: &[f32]) -> anyhow::Result<Evaluation> {
        let result = evaluate(self.kind, params, &self.test, self.backend)?;
        Ok(Evaluation {
            accuracy: Some(result.accuracy),
            loss: result.loss,
        })
    }
}
