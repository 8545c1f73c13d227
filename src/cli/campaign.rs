//! `flywheel campaign ...`: create, inspect and steer campaigns through the control API.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use flywheel_proto::ControlClient;
use flywheel_proto::state::Steer;
use flywheel_proto::v1::{
    CampaignAction, CreateCampaignRequest, ExtendCampaignRequest, ListArtifactsRequest,
    RetryStageRequest, SetPromotionGateRequest,
};

use super::common::{ControlOpts, parse_requirement, read_with_params, status_error};

#[derive(Subcommand)]
pub(super) enum CampaignCommand {
    /// Validate and submit a campaign spec (or a template with its values).
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Template values, `name=value` (repeatable), for `{{ name }}` placeholders.
        #[arg(long = "param")]
        params: Vec<String>,
        /// Makes the call idempotent: run it again with the same id (after a timeout, say) and
        /// the campaign the first call created is returned instead of a second one.
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        opts: ControlOpts,
    },
    List {
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Rounds, stages, tasks and artifacts of a campaign.
    Show {
        id: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Pause {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Resume {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Re-run a failed stage of a round and everything downstream of it.
    RetryStage {
        id: String,
        /// The round, counting from 1 as everywhere it is shown.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        round: i32,
        #[arg(long)]
        stage: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Add rounds; a campaign that finished its rounds runs again from its current generator.
    Extend {
        id: String,
        #[arg(long)]
        rounds: u32,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Replace a promote stage's gate for the rounds still to be planned.
    SetGate {
        id: String,
        /// The promote stage.
        #[arg(long, default_value = "promote")]
        stage: String,
        /// `<stage>.<metric><op><number>`, e.g. `evaluate.win_rate>=0.6` (repeatable).
        #[arg(long = "require", required = true)]
        require: Vec<String>,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Print a finished round's data card and model card (markdown).
    Cards {
        id: String,
        /// The round, counting from 1 as everywhere it is shown.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        round: i32,
        /// Only this card: `data` or `model`.
        #[arg(long, value_parser = ["data", "model"])]
        kind: Option<String>,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Follow a campaign's events.
    Events {
        id: String,
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        opts: ControlOpts,
    },
}

pub(super) async fn run(command: CampaignCommand) -> Result<()> {
    match command {
        CampaignCommand::Create {
            file,
            params,
            request_id,
            opts,
        } => {
            let (spec_yaml, params) = read_with_params(&file, &params)?;
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let campaign = c
                .create_campaign_from(CreateCampaignRequest {
                    spec_yaml,
                    params: params.into_iter().collect(),
                    request_id: request_id.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?;
            println!("{}", campaign.id);
        }
        CampaignCommand::List { opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            println!(
                "{:<38} {:<28} {:<10} {:>6}",
                "ID", "NAME", "STATUS", "ROUND"
            );
            for x in c.list_campaigns().await.map_err(status_error)? {
                println!(
                    "{:<38} {:<28} {:<10} {:>3}/{}",
                    x.id,
                    x.name,
                    x.status,
                    x.current_round + 1,
                    x.rounds_total
                );
            }
        }
        CampaignCommand::Show { id, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let d = c.get_campaign(id.clone()).await.map_err(status_error)?;
            let x = d.campaign.context("controller sent no campaign")?;
            println!(
                "campaign {} ({})  status {}  round {}/{}",
                x.name,
                x.id,
                x.status,
                x.current_round + 1,
                x.rounds_total
            );
            println!(
                "generator {} {}",
                x.current_generator_id, x.current_generator_uri
            );
            for r in d.rounds {
                println!(
                    "\nround {}: {} {} {}",
                    r.index + 1,
                    r.status,
                    r.decision,
                    r.decision_reason
                );
                let mut metrics: Vec<_> = r.metrics.iter().collect();
                metrics.sort_by(|a, b| a.0.cmp(b.0));
                for (k, v) in metrics {
                    println!("    {k} = {v:.4}");
                }
                for s in r.stages {
                    let done = s.tasks.iter().filter(|t| t.state == "succeeded").count();
                    println!(
                        "  {:<12} {:<18} {:<18} {}/{} shards",
                        s.name,
                        s.kind,
                        s.state,
                        done,
                        s.tasks.len()
                    );
                    for t in s.tasks.iter().filter(|t| !t.last_error.is_empty()) {
                        println!(
                            "      shard {} attempt {}: {}",
                            t.shard_index, t.attempt, t.last_error
                        );
                    }
                }
            }
            let artifacts = c
                .list_artifacts(ListArtifactsRequest {
                    campaign_id: id.clone(),
                    kind: String::new(),
                })
                .await
                .map_err(status_error)?;
            let endpoints = c.list_endpoints(id).await.map_err(status_error)?;
            if !endpoints.is_empty() {
                println!("\nendpoints:");
                for e in endpoints {
                    println!(
                        "  r{:<3} {:<10} attempt {:<2} {:<8} {} {} ({})",
                        e.round_index + 1,
                        e.stage,
                        e.attempt,
                        e.state,
                        e.url,
                        e.served_name,
                        e.content_hash
                    );
                }
            }
            println!("\nartifacts:");
            for a in artifacts {
                // Rounds count from 1; a spec's starting models belong to none.
                let round = if a.producer_stage.is_empty() {
                    "-".to_string()
                } else {
                    (a.round_index + 1).to_string()
                };
                println!(
                    "  r{:<3} {:<8} {:<10} {:<10} {}",
                    round, a.kind, a.name, a.producer_stage, a.uri
                );
            }
        }
        CampaignCommand::Cards {
            id,
            round,
            kind,
            opts,
        } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let cards = c.round_cards(id, round - 1).await.map_err(status_error)?;
            if cards.is_empty() {
                anyhow::bail!("round {round} has no cards yet: they are written when it finishes");
            }
            for card in cards
                .iter()
                .filter(|c| kind.as_ref().is_none_or(|k| *k == c.kind))
            {
                println!("{}", card.markdown);
            }
        }
        CampaignCommand::Pause { id, reason, opts } => {
            steer(&opts, id, reason, Steer::Pause).await?
        }
        CampaignCommand::Resume { id, reason, opts } => {
            steer(&opts, id, reason, Steer::Resume).await?
        }
        CampaignCommand::Cancel { id, reason, opts } => {
            steer(&opts, id, reason, Steer::Cancel).await?
        }
        CampaignCommand::RetryStage {
            id,
            round,
            stage,
            opts,
        } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let ids = c
                .retry_stage(RetryStageRequest {
                    campaign_id: id,
                    round_index: round - 1,
                    stage,
                })
                .await
                .map_err(status_error)?;
            println!("{} task(s) will run again", ids.len());
        }
        CampaignCommand::Extend {
            id,
            rounds,
            reason,
            opts,
        } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let x = c
                .extend_campaign(ExtendCampaignRequest {
                    campaign_id: id,
                    rounds,
                    reason,
                })
                .await
                .map_err(status_error)?;
            println!("{} {} rounds {}", x.id, x.status, x.rounds_total);
        }
        CampaignCommand::SetGate {
            id,
            stage,
            require,
            reason,
            opts,
        } => {
            let require = require
                .iter()
                .map(|r| parse_requirement(r))
                .collect::<Result<_>>()?;
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let x = c
                .set_promotion_gate(SetPromotionGateRequest {
                    campaign_id: id,
                    stage,
                    require,
                    reason,
                })
                .await
                .map_err(status_error)?;
            println!("{} gate changed for rounds after {}", x.id, x.current_round);
        }
        CampaignCommand::Events { id, after, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let mut stream = c.stream_events(id, after).await.map_err(status_error)?;
            while let Some(e) = stream.message().await.map_err(status_error)? {
                println!(
                    "{} {:>6} {:<18} {:<12} {}",
                    e.created_at, e.id, e.kind, e.actor, e.message
                );
            }
        }
    }
    Ok(())
}

/// Pause, resume or cancel a campaign; prints its new status.
async fn steer(opts: &ControlOpts, id: String, reason: String, action: Steer) -> Result<()> {
    let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
    let req = CampaignAction {
        campaign_id: id,
        reason,
    };
    let x = match action {
        Steer::Pause => c.pause_campaign(req).await,
        Steer::Resume => c.resume_campaign(req).await,
        Steer::Cancel => c.cancel_campaign(req).await,
    }
    .map_err(status_error)?;
    println!("{} {}", x.id, x.status);
    Ok(())
}
