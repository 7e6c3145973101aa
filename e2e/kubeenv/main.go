// kubeenv runs real Kubernetes clusters on loopback for meshpilot's e2e tests,
// built from the official Kubernetes modules:
//
//	kubeenv cluster --name NAME --dir DIR --port PORT
//
// starts, in one process, an embedded etcd (PORT+1, PORT+2; data in DIR/etcd)
// and kube-apiserver (PORT, RBAC on, client-certificate admin), then two child
// processes of this binary: the real kube-controller-manager (endpointslice,
// serviceaccount, serviceaccount-token and namespace controllers) and a fake
// kubelet that binds Pods to its Node and marks them Running and Ready with the
// pod IP given in the annotation e2e.meshpilot.dev/pod-ip (the address of the
// real process playing the pod). It writes DIR/admin.kubeconfig (context
// NAME-context) and then DIR/ready. Restarting it on the same DIR keeps the data.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/pflag"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kubeenv cluster|controller-manager|kubelet [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "cluster":
		err = runCluster(os.Args[2:])
	case "controller-manager":
		err = runControllerManager(os.Args[2:])
	case "kubelet":
		err = runKubelet(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeenv:", err)
		os.Exit(1)
	}
}

func runCluster(args []string) error {
	fs := pflag.NewFlagSet("cluster", pflag.ContinueOnError)
	name := fs.String("name", "", "cluster name (the kubeconfig context is NAME-context)")
	dir := fs.String("dir", "", "state directory (certificates, etcd data, kubeconfig)")
	port := fs.Int("port", 0, "kube-apiserver port; etcd uses PORT+1 and PORT+2")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" || *dir == "" || *port == 0 {
		return fmt.Errorf("--name, --dir and --port are required")
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(*dir, "ready"))
	pki, err := ensurePKI(*dir)
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	kubeconfig := filepath.Join(*dir, "admin.kubeconfig")
	if err := writeKubeconfig(kubeconfig, *name, *port, pki); err != nil {
		return err
	}
	etcd, err := startEtcd(filepath.Join(*dir, "etcd"), *port+1, *port+2)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	apiErr := make(chan error, 1)
	go func() { apiErr <- runAPIServer(*dir, *port, *port+1, pki) }()
	if err := waitReady(ctx, kubeconfig, apiErr); err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}

	self, _ := os.Executable()
	children := []*exec.Cmd{
		exec.Command(self, "controller-manager", "--kubeconfig", kubeconfig, "--dir", *dir),
		exec.Command(self, "kubelet", "--kubeconfig", kubeconfig, "--node", *name+"-node"),
	}
	for _, c := range children {
		log, err := os.Create(filepath.Join(*dir, c.Args[1]+".log"))
		if err != nil {
			return err
		}
		c.Stdout, c.Stderr = log, log
		// The children die with this process (a killed cluster is wholly gone).
		c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := c.Start(); err != nil {
			return fmt.Errorf("starting %s: %w", c.Args[1], err)
		}
	}
	defer func() {
		for _, c := range children {
			_ = c.Process.Kill()
			_, _ = c.Process.Wait()
		}
	}()
	if err := waitControllers(ctx, kubeconfig); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(*dir, "ready"), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return err
	}
	fmt.Printf("cluster %s ready: KUBECONFIG=%s (context %s-context)\n", *name, kubeconfig, *name)
	select {
	case <-ctx.Done():
		return nil
	case err := <-apiErr:
		return fmt.Errorf("kube-apiserver exited: %v", err)
	case <-etcd.Err():
		return fmt.Errorf("etcd failed")
	case <-time.After(100 * 365 * 24 * time.Hour):
		return nil
	}
}
