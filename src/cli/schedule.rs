//! `flywheel schedule ...` and the campaign-steering subcommands added with schedules.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use flywheel_proto::ControlClient;
use flywheel_proto::v1::{CreateScheduleRequest, Schedule};

use super::common::{ControlOpts, read_with_params, status_error};

#[derive(Subcommand)]
pub(crate) enum ScheduleCommand {
    /// Create a schedule: a cron expression in a time zone that fires a campaign template.
    Create {
        #[arg(long)]
        name: String,
        /// Five fields (minute hour day-of-month month day-of-week), six with seconds first, or
        /// @hourly, @daily, @weekly, @monthly, @yearly.
        #[arg(long)]
        cron: String,
        /// IANA time zone the cron expression is read in.
        #[arg(long = "tz", default_value = "UTC")]
        time_zone: String,
        /// Campaign spec template (YAML with `{{ name }}` placeholders).
        #[arg(short = 'f', long = "template")]
        template: PathBuf,
        /// Template values, `name=value` (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        #[arg(long, default_value = "new_campaign", value_parser = ["new_campaign", "append_rounds"])]
        mode: String,
        /// Rounds each firing appends (append_rounds).
        #[arg(long, default_value_t = 1)]
        rounds_per_fire: u32,
        /// What a firing does while the previous run is still going.
        #[arg(long, default_value = "skip", value_parser = ["skip", "buffer_one", "cancel_old", "allow"])]
        overlap: String,
        /// How late a missed firing may still run after downtime: seconds, or 30s, 10m, 2h, 1d.
        #[arg(long, default_value = "10m")]
        catch_up: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Schedules with their next firing times.
    List {
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// A schedule's settings, next firings and recent runs.
    Show {
        schedule: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Pause {
        schedule: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Resume {
        schedule: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Delete a schedule (the campaigns it started stay).
    Delete {
        schedule: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
}

/// `30s`, `10m`, `2h`, `1d` or plain seconds.
fn parse_duration_s(text: &str) -> Result<u32> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u32 = num
        .parse()
        .with_context(|| format!("--catch-up {text:?}: expected a number with s, m, h or d"))?;
    let unit_s = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("--catch-up {text:?}: unit must be s, m, h or d"),
    };
    n.checked_mul(unit_s)
        .with_context(|| format!("--catch-up {text:?}: too long"))
}

fn print_schedule(s: &Schedule) {
    println!(
        "{:<24} {:<9} {:<20} {:<16} {:<13} {:<10} {}",
        s.name,
        s.status,
        s.cron,
        s.time_zone,
        s.mode,
        s.overlap,
        if s.next_fire_at.is_empty() {
            "-"
        } else {
            &s.next_fire_at
        }
    );
}

pub(crate) async fn run(command: ScheduleCommand) -> Result<()> {
    match command {
        ScheduleCommand::Create {
            name,
            cron,
            time_zone,
            template,
            params,
            mode,
            rounds_per_fire,
            overlap,
            catch_up,
            opts,
        } => {
            let (template_yaml, params) = read_with_params(&template, &params)?;
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let s = c
                .create_schedule(CreateScheduleRequest {
                    name,
                    cron,
                    time_zone,
                    template_yaml,
                    params: params.into_iter().collect(),
                    mode,
                    rounds_per_fire,
                    overlap,
                    catch_up_window_s: parse_duration_s(&catch_up)?,
                })
                .await
                .map_err(status_error)?;
            println!("{} next firings: {}", s.id, s.upcoming.join(", "));
        }
        ScheduleCommand::List { opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            println!(
                "{:<24} {:<9} {:<20} {:<16} {:<13} {:<10} NEXT FIRING",
                "NAME", "STATUS", "CRON", "TIME ZONE", "MODE", "OVERLAP"
            );
            for s in c.list_schedules().await.map_err(status_error)? {
                print_schedule(&s);
            }
        }
        ScheduleCommand::Show { schedule, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let d = c.get_schedule(schedule).await.map_err(status_error)?;
            let s = d.schedule.context("controller sent no schedule")?;
            println!(
                "schedule {} ({})  {}  {:?} in {}  mode {} (+{} round(s))  overlap {}  catch-up {}s",
                s.name,
                s.id,
                s.status,
                s.cron,
                s.time_zone,
                s.mode,
                s.rounds_per_fire,
                s.overlap,
                s.catch_up_window_s
            );
            if !s.buffered_for.is_empty() {
                println!("buffered firing for {}", s.buffered_for);
            }
            println!("next firings: {}", s.upcoming.join(", "));
            println!("\nrecent runs:");
            for r in d.runs {
                println!(
                    "  {} {:<16} {:<38} {}",
                    r.scheduled_for, r.outcome, r.campaign_id, r.message
                );
            }
        }
        ScheduleCommand::Pause { schedule, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            print_schedule(&c.pause_schedule(schedule).await.map_err(status_error)?);
        }
        ScheduleCommand::Resume { schedule, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            print_schedule(&c.resume_schedule(schedule).await.map_err(status_error)?);
        }
        ScheduleCommand::Delete { schedule, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            c.delete_schedule(schedule.clone())
                .await
                .map_err(status_error)?;
            println!("schedule {schedule} deleted");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("90").unwrap(), 90);
        assert_eq!(parse_duration_s("10m").unwrap(), 600);
        assert_eq!(parse_duration_s("2h").unwrap(), 7200);
        assert!(parse_duration_s("5w").is_err());
    }
}
