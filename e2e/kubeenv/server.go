package main

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"

	"github.com/spf13/pflag"
)

func startEtcd(dataDir string, clientPort, peerPort int) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Dir = dataDir
	cfg.Name = "etcd"
	client, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(clientPort))
	peer, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(peerPort))
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "error"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("not ready after 60s")
	}
}

func runAPIServer(dir string, port, etcdPort int, pki *PKI) error {
	cmd := apiserverapp.NewAPIServerCommand()
	cmd.SetArgs([]string{
		"--etcd-servers=http://127.0.0.1:" + strconv.Itoa(etcdPort),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + pki.ServerCert,
		"--tls-private-key-file=" + pki.ServerKey,
		"--client-ca-file=" + pki.CACert,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + pki.SAPub,
		"--service-account-signing-key-file=" + pki.SAKey,
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--enable-priority-and-fairness=false",
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--v=0",
	})
	return cmd.Execute()
}

func clientFor(kubeconfig string) (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	// client-go's default (5/s, bursts of 10) made the kubelet stand-in take
	// 7 minutes over 1,000 pods.
	cfg.QPS, cfg.Burst = 500, 1000
	return kubernetes.NewForConfig(cfg)
}

func waitReady(ctx context.Context, kubeconfig string, failed <-chan error) error {
	cs, err := clientFor(kubeconfig)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(120 * time.Second)
	for {
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(body) == "ok" {
			return nil
		}
		select {
		case err := <-failed:
			return fmt.Errorf("exited: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after 120s: %v", err)
		}
	}
}

// waitControllers waits until the controllers have done their first work: the
// default ServiceAccount exists (so Pods can be created) and the kubelet's Node
// is registered.
func waitControllers(ctx context.Context, kubeconfig string) error {
	cs, err := clientFor(kubeconfig)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(120 * time.Second)
	for {
		_, saErr := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		nodes, nodeErr := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if saErr == nil && nodeErr == nil && len(nodes.Items) > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("controllers not ready after 120s: serviceaccount: %v, nodes: %v", saErr, nodeErr)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func runControllerManager(args []string) error {
	fs := pflag.NewFlagSet("controller-manager", pflag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	dir := fs.String("dir", "", "state directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	pki := pkiPaths(*dir)
	cmd := kcmapp.NewControllerManagerCommand()
	cmd.SetArgs([]string{
		"--kubeconfig=" + *kubeconfig,
		"--controllers=endpointslice,endpointslicemirroring,serviceaccount,serviceaccount-token,namespace,garbagecollector",
		"--service-account-private-key-file=" + pki.SAKey,
		"--root-ca-file=" + pki.CACert,
		"--leader-elect=false",
		"--use-service-account-credentials=false",
		"--secure-port=0",
		"--concurrent-service-endpoint-syncs=5",
		// The benchmark mesh loads thousands of objects at once (default 20/s).
		"--kube-api-qps=200",
		"--kube-api-burst=400",
		"--endpointslice-updates-batch-period=0s",
		"--v=0",
	})
	return cmd.Execute()
}
